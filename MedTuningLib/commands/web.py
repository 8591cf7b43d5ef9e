"""``medtuning web``: the browser app (trame-slicer) on this machine's MRML scene and backend.

The checks that need no trame run first (token rule, port, packages), so a wrong start says what
to do with a code before anything heavy is imported; :mod:`MedTuningLib.web.app` (trame, VTK,
slicer-core) is imported only here, never by the backend or ``medtuning --help``.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

from MedTuningLib.errors import MedTuningError
from MedTuningLib.paths import default_cases_dir, default_models_dir
from MedTuningLib.web.access import access_policy, check_port_free


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # a broken or blocked package counts as missing
        return False


def run(args, ctx) -> dict:
    policy = access_policy(args.host, args.token)
    missing = [m for m in ("trame", "trame_slicer", "slicer") if not _installed(m)]
    if missing:
        raise MedTuningError("WEB_UNAVAILABLE", f"the browser app needs {', '.join(missing)}, which is not installed",
                             "install the web extra: pip install 'medtuning[web]' (trame-slicer[standalone]==2.0.0)")
    check_port_free(args.host, args.port)
    # VTK renders offscreen through EGL (Mesa's software renderer where there is no GPU); naming the
    # window class skips the X display probe of a machine without a display.
    os.environ.setdefault("VTK_DEFAULT_OPENGL_WINDOW", "vtkEGLRenderWindow")
    os.environ["WSLINK_READY_MSG"] = ""  # wslink writes it to stdout, which is the event stream

    from MedTuningLib.web.app import WebConfig, serve

    config = WebConfig(host=args.host, port=args.port, token=policy.token,
                       models_dir=Path(args.models or default_models_dir()),
                       cases_dir=Path(args.cases or default_cases_dir()),
                       python=args.python or sys.executable, device=args.device, scans_dir=args.scans)
    ctx.events.start("web", device=args.device)

    def ready(url: str) -> None:
        ctx.events.log(f"MedTuning in the browser: {url}", url=url, port=config.bound_port,
                       token_generated=policy.generated)
        if policy.generated:
            ctx.events.log("an access token was made for this non-loopback address: share the whole address",
                           level="warning")

    serve(config, ready, cancel=ctx.cancel)
    return {"url": config.url()}
