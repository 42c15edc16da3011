"""Fault injection for tests that run real jobs in subprocesses: put this folder first on PYTHONPATH and set

    DBSCALE_TEST_KILL_AFTER_STEP=N        a real SIGKILL right after step N (and its checkpoint, if one was due)
    DBSCALE_TEST_INTERRUPT_AFTER_STEP=N   a real SIGINT after step N (the job saves and stops after the next one)

It patches Trainer.after_step, the seam the trainer leaves for this; the production code reads no test variable.
"""

import os
import signal

_kill = int(os.environ.get("DBSCALE_TEST_KILL_AFTER_STEP", "-1"))
_interrupt = int(os.environ.get("DBSCALE_TEST_INTERRUPT_AFTER_STEP", "-1"))

if _kill >= 0 or _interrupt >= 0:
    import importlib.abc
    import sys

    def _patch(module) -> None:
        def after_step(self, step: int) -> None:
            if step == _kill:
                os.kill(os.getpid(), signal.SIGKILL)
            if step == _interrupt:
                os.kill(os.getpid(), signal.SIGINT)

        module.Trainer.after_step = after_step

    class _PatchOnImport(importlib.abc.MetaPathFinder):
        """Patch dbscale.train.trainer as soon as a job imports it (nothing is imported here before that)."""

        def find_spec(self, name, path=None, target=None):
            if name != "dbscale.train.trainer":
                return None
            sys.meta_path.remove(self)
            import importlib.util

            spec = importlib.util.find_spec(name)
            loader = spec.loader
            exec_module = loader.exec_module

            def exec_and_patch(module):
                exec_module(module)
                _patch(module)

            loader.exec_module = exec_and_patch
            return spec

    sys.meta_path.insert(0, _PatchOnImport())
