"""Inside Slicer: the module's library imports, and PythonSlicer runs the backend with events."""

import os
import shutil
import sys
import tempfile
import unittest

import slicer


class MedTuningBackendTest(unittest.TestCase):
    def setUp(self):
        slicer.util.selectModule("MedTuning")  # loads the module, which puts MedTuningLib on sys.path
        import MedTuning

        self.module = MedTuning
        self.tempDir = tempfile.mkdtemp(prefix="MedTuningBackendTest-")

    def tearDown(self):
        shutil.rmtree(self.tempDir, ignore_errors=True)

    def test_library_found(self):
        self.assertTrue(os.path.isdir(os.path.join(self.module.LIBRARY_ROOT, "MedTuningLib")))
        self.assertTrue(os.path.isfile(self.module.resourcePath("UI/MedTuning.ui")))

    def test_usage_error_event_through_slicer_python(self):
        from MedTuningLib.slicer_bridge.process import BackendProcess, ExitKind

        logic = self.module.MedTuningLogic()
        argv = [logic.backendPython(), "-m", "MedTuningLib", "train", "--library", self.tempDir, "--events", "jsonl"]
        run = BackendProcess(argv, pythonpath=self.module.LIBRARY_ROOT, cwd=self.tempDir).start()
        self.assertEqual(run.wait(timeout=300), 2, run.stderr_tail())
        self.assertEqual(run.exit, ExitKind.BAD_INPUT)
        self.assertEqual(run.state.error_code, "USAGE")

    def test_widget_builds(self):
        widget = slicer.modules.medtuning.widgetRepresentation().self()
        self.assertIsNotNone(widget.ui.segmentButton)
        self.assertEqual(widget.ui.segmentButton.text, "Segment")
        self.assertFalse(widget.ui.autoRetrainCheckBox.checked)  # retraining is off unless turned on


if __name__ == "__main__":
    unittest.main()
