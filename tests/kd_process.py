"""`kd COMMAND ...` in a process of its own, started in milliseconds instead of seconds.

A `python -m stages.cli` process spends most of a tiny test's run importing (torch, torchvision and the torch
compiler it pulls in, scikit-learn, zarr, h5py, dvclive: about 6 of its 7 seconds on these 2 cores). Here a
multiprocessing fork server imports them once per test worker, and each command runs in a process forked from it:
a real process of its own (its own pid, memory, pipes, session), which the tests SIGKILL, SIGSTOP and resume as
they would a fresh `python -m stages.cli`, reading its output as it comes.

What differs from a fresh interpreter, and why it does not matter to the tests that use this:
- the modules are imported before the command's environment is set: the process sets its torch threads from
  OMP_NUM_THREADS itself (below), kd reads the environment only when it runs, and tqdm's `TQDM_*` settings are the
  test worker's;
- its multiprocessing start method is reset to the platform's default, so DataLoader workers start as they would
  from a fresh `kd`;
- the processes share one hash seed and numpy's unseeded global generator (kd seeds every draw it makes), and the
  exit runs no `atexit` handlers (kd registers none; the commands close their own files).
`torchrun` (`-m torch.distributed.run`) runs here too, and starts its ranks as real `python -m stages.cli`
processes; so do the benchmarks' scripts, whose own measured runs start the real interpreter. `dvc repro`'s stages
are real `kd` commands.
"""

from __future__ import annotations

import multiprocessing
import os
import subprocess
import sys
import tempfile
from multiprocessing import reduction

PRELOAD = ["torch", "torchvision", "sklearn.model_selection", "sklearn.datasets", "dvclive", "zarr", "h5py", "tqdm",
           "stages.cli", "stages.common", "pipeline.train", "pipeline.cache", "pipeline.data", "pipeline.models",
           "pipeline.store", "pipeline.writer"]
_context = None


def context():
    """The fork server's context, started (and PRELOAD imported there) on first use."""
    global _context
    if _context is None:
        _context = multiprocessing.get_context("forkserver")
        _context.set_forkserver_preload(PRELOAD)
    return _context


class _Fd:
    """A file descriptor handed to the forked process (duplicated into it when the process starts)."""

    def __init__(self, fd: int):
        self.fd = fd

    def __reduce__(self):
        return _detach, (reduction.DupFd(self.fd),)


def _detach(dup) -> int:
    return dup.detach()


def _kd(args: list[str], env: dict, cwd: str, stdout: int, stderr: int, new_session: bool, script: str | None
        ) -> None:
    """The forked process: the command's session, output, environment and directory, then `kd ARGS` (or, with
    `script`, `python -c SCRIPT ARGS`; with a `script` of `-m NAME`, `python -m NAME ARGS`; of `PATH.py`, `python
    PATH.py ARGS`)."""
    if new_session:
        os.setsid()
    sys.stdout.flush()
    sys.stderr.flush()
    os.dup2(stdout, 1)
    os.dup2(stderr, 2)
    os.close(stdout)
    if stderr != stdout:
        os.close(stderr)
    os.environ.clear()
    os.environ.update(env)
    os.chdir(cwd)
    multiprocessing.set_start_method(None, force=True)  # DataLoader workers started as a fresh process would
    import torch

    if env.get("OMP_NUM_THREADS"):
        torch.set_num_threads(int(env["OMP_NUM_THREADS"]))
    if script is None:
        from stages.cli import kd

        sys.argv = ["kd", *args]
        kd.main(args=args, prog_name="kd")  # exits: SystemExit's code is the process's
    elif script.endswith(".py"):
        import runpy

        sys.argv = [script, *args]
        sys.path.insert(0, os.path.dirname(os.path.abspath(script)))  # as `python PATH.py` puts it first
        runpy.run_path(script, run_name="__main__")
    elif script.startswith("-m "):
        import runpy

        sys.argv = [script[3:], *args]  # run_module sets sys.argv[0] to the module's file
        runpy.run_module(script[3:], run_name="__main__", alter_sys=True)
    else:
        sys.argv = ["-c", *args]
        exec(compile(script, "<string>", "exec"), {"__name__": "__main__"})


class Process:
    """`subprocess.Popen([python, -m, stages.cli, *args], stdout=PIPE, stderr=STDOUT, text=True)`'s parts the tests
    use: pid, stdout (read as it comes), poll, wait, returncode (minus the signal that killed it), send_signal,
    kill."""

    def __init__(self, args, env: dict, cwd=None, new_session: bool = False, script: str | None = None):
        read, write = os.pipe()
        self._process = context().Process(target=_kd, args=(
            [str(a) for a in args], dict(env), str(cwd or os.getcwd()), _Fd(write), _Fd(write), new_session, script))
        self._process.start()
        os.close(write)
        self.pid = self._process.pid
        self.stdout = open(read, encoding="utf-8", errors="replace", newline="")
        self.returncode = None

    def poll(self):
        if self._process.exitcode is not None:
            self.returncode = self._process.exitcode
        return self.returncode

    def wait(self, timeout=None):
        self._process.join(timeout)
        if self.poll() is None:
            raise subprocess.TimeoutExpired(["kd"], timeout)
        return self.returncode

    def send_signal(self, sig: int) -> None:
        os.kill(self.pid, sig)

    def kill(self) -> None:
        self._process.kill()


def run(args, env: dict, cwd=None, script: str | None = None, timeout: float | None = None
        ) -> subprocess.CompletedProcess:
    """`subprocess.run([python, -m, stages.cli, *args], capture_output=True, text=True)` (with `script`: `[python,
    -c, script, *args]`, for `-m NAME` `[python, -m, NAME, *args]`, for `PATH.py` `[python, PATH.py, *args]`), in a
    forked process."""
    command = ["kd" if script is None else script, *map(str, args)]
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        process = context().Process(target=_kd, args=(
            [str(a) for a in args], dict(env), str(cwd or os.getcwd()), _Fd(out.fileno()), _Fd(err.fileno()), False,
            script))
        process.start()
        process.join(timeout)
        if process.exitcode is None:
            process.kill()
            process.join()
            raise subprocess.TimeoutExpired(command, timeout)
        out.seek(0)
        err.seek(0)
        return subprocess.CompletedProcess(command, process.exitcode,
                                           out.read().decode("utf-8", "replace"), err.read().decode("utf-8", "replace"))
