"""setup.py's build command, without building: the persistent ninja directory and the one
line a `pip install -e .` prints (archs, time, objects compiled vs reused)."""
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _setup_module():
    spec = importlib.util.spec_from_file_location("ragged_setup", ROOT / "setup.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)          # setup() runs only as __main__
    return mod


def test_arch_names_and_summary_line():
    s = _setup_module()
    assert s.arch_names("8.0;9.0a") == "sm_80, sm_90a"
    assert s.arch_names("8.0 9.0+PTX") == "sm_80, sm_90"
    line = s.summary_line("8.0;9.0a", 61.24, 2, 6)
    assert line == ("ragged-kernels: built kernels._C for sm_80, sm_90a in 61.2 s (2 of 6 objects "
                    "compiled, 4 reused by ninja from build/ninja/)")


def test_build_dir_persists_and_is_ignored(tmp_path):
    s = _setup_module()
    assert Path(s.BUILD_TEMP) == ROOT / "build" / "ninja"
    r = subprocess.run(["git", "check-ignore", "-q", "build/ninja/x.o"], cwd=ROOT)
    assert r.returncode == 0, "build/ninja/ must be git-ignored"


def test_build_command_counts_compiled_and_reused(tmp_path, monkeypatch, capsys):
    """A stand-in for BuildExtension whose build recompiles one of two existing objects (what
    ninja does after one source changed): the line says 1 of 2 compiled, 1 reused."""
    s = _setup_module()
    monkeypatch.setattr(s, "BUILD_TEMP", str(tmp_path))
    (tmp_path / "a.o").write_bytes(b"a")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.o").write_bytes(b"b")
    os.utime(tmp_path / "a.o", (1, 1))

    class FakeBase:
        def finalize_options(self):
            self.build_temp = "/tmp/some-editable-wheel-tempdir"

        def build_extensions(self):
            os.utime(tmp_path / "a.o", None)          # recompiled: a new mtime

    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "9.0a")
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)   # no copy to a developer's tty
    cmd = s.build_command(FakeBase)()
    cmd.finalize_options()
    assert cmd.build_temp == str(tmp_path)            # not setuptools' temporary directory
    cmd.build_extensions()
    err = capsys.readouterr().err
    assert "built kernels._C for sm_90a in " in err and "(1 of 2 objects compiled, 1 reused" in err
