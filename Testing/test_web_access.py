"""Who may use ``medtuning web``: loopback by default, a token elsewhere (checked in a real browser),
the start-up errors with their codes, and a backend / ``--help`` that never need trame."""

from __future__ import annotations

import socket
import subprocess
import sys
import textwrap

import pytest

from web_helpers import ROOT, chromium, open_app, require_chromium, shot, web_server

from MedTuningLib.web.access import access_policy, is_loopback


@pytest.mark.parametrize("host,loopback", [("127.0.0.1", True), ("127.0.0.2", True), ("localhost", True),
                                           ("::1", True), ("[::1]", True), ("0.0.0.0", False), ("192.168.1.20", False),
                                           ("::", False), ("scanner-room.example.org", False)])
def test_loopback_addresses(host, loopback):
    assert is_loopback(host) is loopback


def test_outside_address_gets_a_token_loopback_none():
    assert access_policy("127.0.0.1", None).token is None
    outside = access_policy("0.0.0.0", None)
    assert outside.generated and len(outside.token) >= 24
    assert access_policy("0.0.0.0", None).token != outside.token  # made anew, never a fixed default
    given = access_policy("0.0.0.0", "  my-long-token ")
    assert given.token == "my-long-token" and not given.generated
    assert access_policy("127.0.0.1", "t").token == "t"  # a loopback server may ask for one too


def test_empty_token_on_outside_address_is_refused(cli):
    status, events = cli(["web", "--host", "0.0.0.0", "--token", ""])
    assert status == 2
    assert events[-1]["event"] == "error" and events[-1]["code"] == "WEB_TOKEN_REQUIRED" and events[-1]["hint"]


def test_port_in_use_is_refused_with_its_code(cli):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        status, events = cli(["web", "--port", str(port)])
    assert status == 2
    error = events[-1]
    assert error["code"] == "WEB_PORT_IN_USE" and error["port"] == port and "--port" in error["hint"]


BLOCK_TRAME = textwrap.dedent("""
    import io, json, sys
    from contextlib import redirect_stdout

    class NoTrame:  # as if the web extra were not installed
        def find_spec(self, name, path=None, target=None):
            if name.split('.')[0] in ('trame', 'trame_slicer', 'trame_server', 'trame_client', 'vtk', 'vtkmodules', 'slicer'):
                raise ModuleNotFoundError(f'No module named {name!r}', name=name)
            return None

    sys.meta_path.insert(0, NoTrame())
    from MedTuningLib.cli import main
    import MedTuningLib.web, MedTuningLib.web.access, MedTuningLib.commands.segment, MedTuningLib.commands.train
    for argv in (['--help'], ['web', '--help']):
        with redirect_stdout(io.StringIO()) as out:
            assert main(argv) == 0
        assert 'usage' in out.getvalue()
    with redirect_stdout(io.StringIO()) as out:
        status = main(['web', '--port', '0', '--events', 'jsonl'])
    print(json.dumps({'status': status, 'last': json.loads(out.getvalue().splitlines()[-1]),
                      'loaded': sorted(m for m in sys.modules if m.split('.')[0] in ('trame', 'trame_slicer', 'vtk'))}))
""")


def test_backend_and_help_work_without_trame():
    import json

    done = subprocess.run([sys.executable, "-c", BLOCK_TRAME], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["loaded"] == []
    assert report["status"] == 2 and report["last"]["code"] == "WEB_UNAVAILABLE"
    assert "medtuning[web]" in report["last"]["hint"]


def test_token_is_required_in_the_browser(tmp_path):
    require_chromium()
    token = "s3cret-token-for-the-test"
    with web_server(tmp_path / "models", tmp_path / "cases", tmp_path / "home", token=token) as server, \
            chromium() as browser:
        assert server.url.endswith(f"?token={token}")
        base = server.url.split("?")[0]
        page = browser.new_page()
        response = page.goto(base)
        assert response.status == 403 and response.headers.get("x-medtuning-error") == "WEB_TOKEN_REQUIRED"
        assert page.inner_text("#error-code") == "WEB_TOKEN_REQUIRED" and "?token=" in page.inner_text("#error-hint")
        shot_dir = tmp_path / "screenshots"
        shot_dir.mkdir()
        page.screenshot(path=str(shot_dir / "token-required.png"))
        response = page.goto(base + "?token=wrong")
        assert response.status == 403 and page.inner_text("#error-code") == "WEB_TOKEN_INVALID"
        page.close()

        # The right token opens the app; its cookie carries the websocket and later requests.
        app = open_app(browser, server.url)
        shot(app, shot_dir, "token-accepted")
        assert app.goto(base + "index.html").status == 200
        app.close()
        stranger = browser.new_context().new_page()  # no cookie, no token
        assert stranger.goto(base + "index.html").status == 403
    assert server.proc.returncode == 0


def test_upload_names_cannot_leave_the_upload_folder(tmp_path):
    """A crafted client (not a browser) may send any file name: only its base name is used."""
    from MedTuningLib.web.logic.scans import _write_uploads

    folder = tmp_path / "uploads" / "one"
    folder.mkdir(parents=True)
    written = _write_uploads([{"name": "../../evil.nrrd", "content": b"x"}, {"name": "..\\up.nrrd", "content": b"y"},
                              {"name": "..", "content": b"z"}, {"name": "CT chest.nrrd", "content": b"w"}], folder)
    assert [p.name for p in written] == ["evil.nrrd", "up.nrrd", "CT chest.nrrd"]
    assert all(p.parent == folder for p in written)
    assert sorted(p.name for p in tmp_path.rglob("*") if p.is_file()) == ["CT chest.nrrd", "evil.nrrd", "up.nrrd"]
