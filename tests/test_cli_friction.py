"""CLI friction (issue 10, item 8): relative paths, distinct exit codes,
--version, --help without jax, option values checked before any input is read."""

import os
import subprocess
import sys
import time

import numpy as np
import pytest

import jaxjpeg
from jaxjpeg.cli import EXIT_DAMAGED, EXIT_IO, EXIT_USAGE, main

rng = np.random.default_rng(3)
PARAMS = {"dense": {"kernel": rng.standard_normal((256, 512)).astype(np.float32),
                    "bias": np.zeros(512, np.float32)}}


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def one_line_error(err):
    return err.startswith("jaxjpeg: error: ") and err.count("\n") == 1


def test_version(capsys):
    code, out, _ = run(capsys, "--version")
    assert code == 0 and out.strip() == f"jaxjpeg {jaxjpeg.__version__}"


def fresh_python(code: str) -> subprocess.CompletedProcess:
    """``code`` run by a new interpreter (nothing imported yet)."""
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120)


def test_help_does_not_import_jax():
    code = ("import sys\n"
            "from jaxjpeg.cli import main\n"
            "try:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
            "heavy = sorted(m for m in sys.modules if m.split('.')[0] in ('jax', 'jaxlib', 'ml_dtypes'))\n"
            "print('HEAVY', heavy)\n")
    proc = fresh_python(code)
    assert proc.returncode == 0, proc.stderr
    assert "usage: jaxjpeg" in proc.stdout and "exit status" in proc.stdout
    assert "HEAVY []" in proc.stdout


def test_import_jaxjpeg_is_lazy_but_complete():
    code = ("import sys, jaxjpeg\n"
            "assert 'jax' not in sys.modules\n"
            "assert callable(jaxjpeg.save) and callable(jaxjpeg.open)\n"
            "assert 'jax' in sys.modules\n"
            "from jaxjpeg import FormatError, restore, __version__\n"
            "assert jaxjpeg.checkpoint.save is jaxjpeg.save\n"
            "assert set(jaxjpeg.__all__) <= set(dir(jaxjpeg))\n")
    proc = fresh_python(code)
    assert proc.returncode == 0, proc.stderr


@pytest.mark.parametrize("option", [
    ("--quality", "0"), ("--quality", "101"), ("--quality", "x"),
    ("--quant-step", "0"), ("--quant-step", "-1"), ("--quant-step", "nan"),
    ("--quant-step", "0.5"), ("--quant-step", "300"),   # found by review: refused after reading
    ("--target-ratio", "inf"), ("--bits-per-weight", "-2"), ("--error-bound", "0"),
    ("--error-bound", "1"), ("--error-bound", "5"),   # found by review: after reading
    ("--min-size", "-1"), ("--bits", "10"),
])
def test_option_values_are_checked_before_the_source_is_read(tmp_path, capsys, option):
    # The source does not exist: a usage error (2), not an I/O error (3),
    # shows the option was refused before anything was read.
    code, _, err = run(capsys, "compress", tmp_path / "missing", tmp_path / "o.jjpg", *option)
    assert code == EXIT_USAGE, err
    assert option[0] in err and "Traceback" not in err
    assert not (tmp_path / "o.jjpg").exists()


def test_export_refuses_to_replace_or_remove_its_own_checkpoint(tmp_path, capsys):
    """Found by review: with --force, an export over its checkpoint replaced
    it, and a checkpoint named model.safetensors in the output directory
    was removed as an earlier export."""
    (tmp_path / "sub").mkdir()
    cases = [(tmp_path / "c.safetensors", tmp_path / "c.safetensors"),
             (tmp_path / "sub" / "model.safetensors", tmp_path / "sub"),
             (tmp_path / "sub" / "model-00001-of-00002.safetensors", tmp_path / "sub")]
    for ckpt, out in cases:
        jaxjpeg.save(ckpt, PARAMS)
        before = ckpt.read_bytes()
        for shards in ("10GB", "200KB"):
            code, _, err = run(capsys, "export", ckpt, out, "--force", "--max-shard-size", shards)
            assert code == EXIT_USAGE and "is the checkpoint being exported" in err, (ckpt, err)
            assert ckpt.read_bytes() == before
        ckpt.unlink()
    ckpt = tmp_path / "sub" / "model.jjpg"    # beside, not replaced: exported
    jaxjpeg.save(ckpt, PARAMS)
    assert run(capsys, "export", ckpt, tmp_path / "sub", "--force")[0] == 0
    assert ckpt.exists() and (tmp_path / "sub" / "model.safetensors").exists()


def test_exit_codes_usage_damaged_io(tmp_path, capsys):
    good = tmp_path / "g.jjpg"
    jaxjpeg.save(good, PARAMS)
    truncated = tmp_path / "t.jjpg"
    truncated.write_bytes(good.read_bytes()[:3000])
    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("x")
    cases = {
        EXIT_USAGE: [("inspect", tmp_path),                      # a directory, not a file
                     ("compress", good, good),                    # DST exists, no --force
                     ("frobnicate",)],
        EXIT_DAMAGED: [("inspect", truncated), ("extract", truncated, tmp_path / "x"),
                       ("verify", truncated), ("compress", truncated, tmp_path / "o.jjpg")],
        EXIT_IO: [("inspect", tmp_path / "missing.jjpg"), ("verify", tmp_path / "missing"),
                  ("compress", tmp_path / "missing", tmp_path / "o.jjpg"),
                  ("extract", good, not_a_dir / "sub")],          # cannot write there
    }
    for expected, argvs in cases.items():
        for argv in argvs:
            code, out, err = run(capsys, *argv)
            assert code == expected, (argv, code, out, err)
            assert "Traceback" not in err
            if argv != ("frobnicate",) and argv[0] != "verify":
                assert one_line_error(err), (argv, err)


def test_relative_paths_everywhere(tmp_path, capsys, monkeypatch):
    """A relative Orbax path failed with "Checkpoint path should be absolute"."""
    import orbax.checkpoint as ocp
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(tmp_path / "orbax_ckpt", PARAMS)
    monkeypatch.chdir(tmp_path)
    code, out, err = run(capsys, "compress", "orbax_ckpt", "out.jjpg", "--quant-step", "2")
    assert code == 0, err
    assert (tmp_path / "out.jjpg").exists()
    assert run(capsys, "verify", "out.jjpg")[0] == 0
    code, out, err = run(capsys, "inspect", "out.jjpg", "--source", "orbax_ckpt")
    assert code == 0, err
    assert "dense/kernel" in out
    assert run(capsys, "extract", "out.jjpg", "tiles")[0] == 0
    assert os.listdir(tmp_path / "tiles")


def test_extract_refuses_a_url_outdir_before_reading(tmp_path, capsys):
    code, _, err = run(capsys, "extract", tmp_path / "missing.jjpg", "gs://bucket/tiles")
    assert code == EXIT_USAGE and "local directory" in err


def test_sources_a_checkpoint_cannot_hold_are_damaged_input_not_usage(tmp_path, capsys):
    """Found by review: leaf paths that nest ('a' and 'a/b', legal in
    safetensors) and a longdouble array exited 2 (bad arguments); they are
    the input's, exit 1, naming the source. (Metadata over its limit, once
    refused here too, is now dropped with a warning: test_cli.py.)"""
    from safetensors.numpy import save_file
    save_file({"a": np.ones(3, np.float32), "a/b": np.ones(3, np.float32)},
              str(tmp_path / "nested.safetensors"))
    np.savez(tmp_path / "long.npz", a=np.ones(3, np.longdouble))
    cases = [("nested.safetensors", "collides")]
    if np.dtype(np.longdouble).itemsize > 8:   # x86-64: float128, which no reader restores
        cases.append(("long.npz", "float128"))
    for name, words in cases:
        code, _, err = run(capsys, "compress", tmp_path / name, tmp_path / "o.jjpg")
        assert code == 1 and words in err and name in err, err
        assert not (tmp_path / "o.jjpg").exists()


def test_a_save_warning_is_one_line_of_its_own(tmp_path, capsys):
    """Found by review: a missed byte target's warning came out as Python's
    'cli.py:605: UserWarning: ...' lines."""
    from safetensors.numpy import save_file
    rng = np.random.default_rng(0)
    save_file({"w": rng.standard_normal((256, 256)).astype(np.float32)},
              str(tmp_path / "s.safetensors"))
    code, _, err = run(capsys, "compress", tmp_path / "s.safetensors", tmp_path / "o.jjpg",
                       "--target-ratio", "1.05")
    assert code == 0, err
    lines = [l for l in err.splitlines() if "warning" in l.lower()]
    assert lines and all(l.startswith("jaxjpeg: warning: target_ratio=1.05") for l in lines), err
    assert "UserWarning" not in err


@pytest.mark.parametrize("argv", [["compress", "--quality", "500", "a.npz", "b.jjpg"],
                                  ["export", "x.jjpg", "memory://x"], ["bogus"], []])
def test_usage_errors_are_one_line(capsys, argv):
    """Found by review: errors argparse caught printed its usage block first
    (6 lines for --quality 500), where the README promises one line."""
    code = main(argv)
    out, err = capsys.readouterr()
    assert code == EXIT_USAGE and err.count("\n") == 1, err
    assert err.startswith("jaxjpeg: error: ") and "--help" in err


def test_a_ctrl_c_while_jax_imports_is_held_then_raised():
    """Found by review: a Ctrl-C in the command's first half second, while
    jax imported, crashed it from C++ (SIGABRT, SIGSEGV) or was swallowed by
    a garbage-collection callback and the command ran to the end."""
    import signal
    import threading

    from jaxjpeg import interrupts
    reached = []
    with pytest.raises(KeyboardInterrupt):
        with interrupts.held():
            os.kill(os.getpid(), signal.SIGINT)
            reached.append("after the signal")   # not interrupted here
    assert reached == ["after the signal"]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    done = []   # another thread cannot hold signals: the block just runs
    thread = threading.Thread(target=lambda: done.append(interrupts.held().__enter__()))
    thread.start()
    thread.join()
    assert done == [None]


@pytest.mark.parametrize("signum", ["SIGTERM", "SIGHUP"])
def test_sigterm_mid_compress_removes_its_temporary_file(tmp_path, signum):
    """Found by review: SIGTERM (timeout, systemd, docker) or SIGHUP ended a
    compress without a word and left its temporary file beside DST; they
    now end it as Ctrl-C does, exiting 128 + the signal's number."""
    import signal
    import time
    src, dst = tmp_path / "big.npz", tmp_path / "out.jjpg"
    np.savez(src, **{f"w{i}": np.random.default_rng(i).standard_normal((1024, 2048))
                     .astype(np.float32) for i in range(12)})
    # (a run under nohup passes SIGHUP on ignored, which a command keeps)
    proc = subprocess.Popen([sys.executable, "-m", "jaxjpeg.cli", "compress", str(src),
                             str(dst), "--target-ratio", "8"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGHUP, signal.SIG_DFL))
    try:
        deadline = time.monotonic() + 120
        while not list(tmp_path.glob("out.jjpg.tmp-*")) and proc.poll() is None:
            assert time.monotonic() < deadline, "no temporary file appeared"
            time.sleep(0.01)
        assert proc.poll() is None, "compress ended before the signal"
        proc.send_signal(getattr(signal, signum))
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 128 + getattr(signal, signum), err
    assert f"terminated ({signum})" in err and "Traceback" not in err, err
    assert not dst.exists() and not list(tmp_path.glob("out.jjpg.tmp-*"))


_DROPPED_SIGTERM = """
import gc, os, signal, sys
import numpy as np
from jaxjpeg import cli
src, dst = sys.argv[1:]
np.savez(src, w=np.random.default_rng(0).standard_normal((256, 256)).astype(np.float32))
fired = []
def collecting(phase, info):
    if not fired:
        fired.append(phase)
        try:
            os.kill(os.getpid(), signal.SIGTERM)
            for _ in range(1000):   # the handler runs here; gc drops its exception
                pass
        except BaseException as e:
            print("raised in the callback:", type(e).__name__, file=sys.stderr)
            raise
gc.callbacks.append(collecting)
sys.argv = ["jaxjpeg", "compress", src, dst]
cli.console()
"""


def test_a_sigterm_dropped_by_a_gc_callback_still_ends_compress(tmp_path):
    """Found by a flaky test: a SIGTERM whose interruption was raised inside
    jax's garbage-collection callback was printed and dropped, and compress
    wrote its file and exited 0. The interruption is raised again before the
    file is put in place."""
    dst = tmp_path / "out.jjpg"
    proc = subprocess.run([sys.executable, "-c", _DROPPED_SIGTERM, str(tmp_path / "w.npz"),
                           str(dst)], capture_output=True, text=True, timeout=300)
    assert "raised in the callback: Terminated" in proc.stderr
    assert proc.returncode == 143, proc.stderr
    assert "terminated (SIGTERM)" in proc.stderr and "Traceback" not in proc.stderr
    assert not dst.exists() and not list(tmp_path.glob("out.jjpg.tmp-*"))


def test_unhelpful_cli_messages_found_by_review(tmp_path, capsys):
    """A PyTorch .pt was "member 'x/data.pkl' is not a .npy array"; compress
    to memory:// printed success and the store went with the process; an
    Orbax item directory was only "is a directory"."""
    import zipfile
    pt = tmp_path / "model.pt"   # the layout torch.save writes
    with zipfile.ZipFile(pt, "w") as z:
        z.writestr("model/data.pkl", b"\x80\x02}q\x00.")
        z.writestr("model/data/0", b"\x00" * 16)
    # a format jaxjpeg does not read is the user's to convert: a usage error
    # (it exited 1, "damaged", found by review)
    assert main(["compress", str(pt), str(tmp_path / "o.jjpg")]) == EXIT_USAGE
    assert "a PyTorch checkpoint" in capsys.readouterr().err
    src = tmp_path / "w.npz"
    np.savez(src, w=np.ones((64, 64), np.float32))
    command = subprocess.run([sys.executable, "-m", "jaxjpeg.cli", "compress", str(src),
                              "memory://bucket/o.jjpg"], capture_output=True, text=True)
    assert command.returncode == EXIT_USAGE
    assert "memory:// lives only as long as this command" in command.stderr
    item = tmp_path / "params"
    item.mkdir()
    jaxjpeg.save(item / "checkpoint.jjpg", {"w": np.ones((64, 64), np.float32)})
    assert main(["inspect", str(item)]) == EXIT_USAGE
    assert "an Orbax item: give" in capsys.readouterr().err


def test_compress_to_a_path_ending_in_a_slash_is_refused(tmp_path, capsys):
    """Found by review: "DST/" was made absolute without its slash and a
    file named DST written."""
    np.savez(tmp_path / "s.npz", w=np.ones((64, 64), np.float32))
    code, _, err = run(capsys, "compress", tmp_path / "s.npz", f"{tmp_path}/out/")
    assert code == EXIT_USAGE and "names a directory" in err
    assert not (tmp_path / "out").exists()


def test_output_piped_into_a_reader_that_stops_ends_quietly(tmp_path):
    """Found by review: `jaxjpeg inspect CKPT | head` printed "error: [Errno
    32] Broken pipe" and exited 3."""
    path = tmp_path / "many.jjpg"
    jaxjpeg.save(path, {f"l{i}": np.arange(8, dtype=np.float32) + i for i in range(3000)})
    command = subprocess.run(
        ["bash", "-c", f"{sys.executable} -m jaxjpeg.cli inspect {path} | head -2; "
                       "echo ${PIPESTATUS[0]} >&2"], capture_output=True, text=True, timeout=120)
    assert command.stdout.splitlines()[1].startswith("l0 "), command.stdout
    assert command.stderr.strip() == "141", command.stderr


def test_a_ctrl_c_after_the_work_is_done_ends_quietly_with_its_result():
    """Found by review: a Ctrl-C just after compress printed its summary
    (the interpreter shutting down) killed the process by SIGINT or printed
    a KeyboardInterrupt traceback; the command's result stands."""
    script = ("import os, signal, threading, time\n"
              "from jaxjpeg import cli\n"
              "def late():\n"
              "    time.sleep(0.5)\n"
              "    os.kill(os.getpid(), signal.SIGINT)\n"
              "    time.sleep(0.5)\n"
              "cli.main = lambda argv=None: (threading.Thread(target=late).start(), 0)[1]\n"
              "cli.console()\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0 and "KeyboardInterrupt" not in done.stderr, done.stderr


def test_a_full_disk_names_the_file_export_and_extract_were_writing(tmp_path, capsys, monkeypatch):
    """Found by review: "jaxjpeg: error: [Errno 28] No space left on device",
    naming no file (compress names its output)."""
    import builtins
    import errno
    ckpt = tmp_path / "c.jjpg"
    jaxjpeg.save(ckpt, PARAMS)
    real_open = builtins.open

    class Full:
        def __init__(self, f):
            self.f = f

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

        def __getattr__(self, name):
            return getattr(self.f, name)

        def write(self, data):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def full_open(path, mode="r", *args, **kwargs):
        f = real_open(path, mode, *args, **kwargs)
        return Full(f) if "w" in mode and str(tmp_path) in str(path) else f

    monkeypatch.setattr(builtins, "open", full_open)
    for argv, named in ((("export", ckpt, tmp_path / "out"), "model.safetensors"),
                        (("extract", ckpt, tmp_path / "tiles"), ".jpg")):
        code, _, err = run(capsys, *argv)
        assert code == EXIT_IO and "No space left on device" in err, err
        assert named in err and ".tmp-" not in err, err


def test_a_second_signal_does_not_cut_the_cleanup_the_first_started(tmp_path):
    """Found by review: a second SIGTERM while extract removed what it had
    written stopped the removal (hundreds of tiles left, exit 143); the
    second is now ignored."""
    ckpt = tmp_path / "many.jjpg"
    rng = np.random.default_rng(0)
    jaxjpeg.save(ckpt, {f"w{i}": rng.normal(size=(64, 64)).astype(np.float32)
                        for i in range(300)})
    out = tmp_path / "tiles"
    script = ("import os, signal, sys\n"
              "from jaxjpeg import cli\n"
              "n = {'tiles': 0, 'unlinks': 0}\n"
              "check = cli._check_tile_file\n"
              "def counted(*a):\n"
              "    n['tiles'] += 1\n"
              "    if n['tiles'] == 200: os.kill(os.getpid(), signal.SIGTERM)\n"
              "    return check(*a)\n"
              "cli._check_tile_file = counted\n"
              "unlink = os.unlink\n"
              "def unlinking(p, *a, **k):\n"
              "    n['unlinks'] += 1\n"
              "    if n['unlinks'] == 20: os.kill(os.getpid(), signal.SIGTERM)\n"
              "    return unlink(p, *a, **k)\n"
              "os.unlink = unlinking\n"
              f"sys.argv = ['jaxjpeg', 'extract', {str(ckpt)!r}, {str(out)!r}]\n"
              "cli.console()\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 143 and "terminated (SIGTERM)" in done.stderr, done.stderr
    assert not out.exists() or not os.listdir(out), sorted(os.listdir(out))[:5]


def test_a_signal_after_the_work_is_done_leaves_the_result(tmp_path):
    """A signal after the work, while the interpreter shuts down, leaves the
    command's result (found by review: a SIGTERM or SIGHUP late in the
    shutdown, after it put back the default handlers, killed a command that
    had succeeded; that moment is not reached from here, an earlier one is)."""
    for signum in ("SIGTERM", "SIGHUP", "SIGINT"):
        script = ("import os, signal, threading, time\n"
                  "from jaxjpeg import cli\n"
                  "def late():\n"
                  "    time.sleep(0.3)\n"
                  f"    os.kill(os.getpid(), signal.{signum})\n"
                  "cli.main = lambda argv=None: (threading.Thread(target=late).start(), 0)[1]\n"
                  "import atexit\n"
                  "atexit.register(lambda: time.sleep(0.6))   # a slow shutdown\n"
                  "cli.console()\n")
        done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                              timeout=60)
        assert done.returncode == 0, (signum, done.returncode, done.stderr)


def test_a_third_signal_ends_a_stalled_cleanup():
    """The second signal is ignored while the first's cleanup runs; a third
    ends the process at once, for a cleanup stalled on a store that stopped
    answering."""
    script = ("import os, signal, threading, time\n"
              "from jaxjpeg import cli\n"
              "def send():\n"
              "    for _ in range(3):\n"
              "        time.sleep(0.3)\n"
              "        os.kill(os.getpid(), signal.SIGTERM)\n"
              "def command(argv=None):\n"
              "    threading.Thread(target=send, daemon=True).start()\n"
              "    try:\n"
              "        time.sleep(30)\n"
              "    finally:\n"
              "        print('cleanup', flush=True)\n"
              "        time.sleep(30)   # stalled\n"
              "cli.main = command\n"
              "cli.console()\n")
    started = time.monotonic()
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 143 and "cleanup" in done.stdout, (done.returncode, done.stderr)
    assert time.monotonic() - started < 20


def test_held_signals_go_to_the_callers_own_handlers(tmp_path):
    """Found by review: an export called from the caller's code, signalled
    while it renamed its files, raised jaxjpeg's interruption and bypassed
    the caller's handler (or the caller's SIG_IGN)."""
    import signal
    from jaxjpeg import interrupts
    calls = []
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: calls.append(signum))
    try:
        with interrupts.held():
            os.kill(os.getpid(), signal.SIGTERM)
        assert calls == [signal.SIGTERM]
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        with interrupts.held():
            os.kill(os.getpid(), signal.SIGTERM)   # ignored, as the caller asked
    finally:
        signal.signal(signal.SIGTERM, previous)


def test_the_command_keeps_signals_it_inherited_ignored():
    """Found by review: under nohup (SIGHUP ignored) the command still ended
    on a hangup."""
    script = ("import os, signal, threading, time\n"
              "signal.signal(signal.SIGHUP, signal.SIG_IGN)\n"
              "from jaxjpeg import cli\n"
              "def command(argv=None):\n"
              "    os.kill(os.getpid(), signal.SIGHUP)\n"
              "    time.sleep(0.2)\n"
              "    print('survived', flush=True)\n"
              "    return 0\n"
              "cli.main = command\n"
              "cli.console()\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0 and "survived" in done.stdout, (done.returncode, done.stderr)


def test_every_held_signal_is_delivered_even_after_one_raises():
    """Found by review: SIGINT then SIGTERM held, the default SIGINT handler
    raised and SIGTERM was lost (exit 0 where the plain process ends 143);
    two SIGINTs reached the caller's handler once."""
    script = ("import os, signal, sys\n"
              "from jaxjpeg import interrupts\n"
              "try:\n"
              "    with interrupts.held():\n"
              "        os.kill(os.getpid(), signal.SIGINT)\n"
              "        os.kill(os.getpid(), signal.SIGTERM)\n"
              "except KeyboardInterrupt:\n"
              "    pass\n"
              "print('not ended', flush=True)\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == -15 and "not ended" not in done.stdout, done
    import signal
    from jaxjpeg import interrupts
    calls = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: calls.append(signum))
    try:
        with interrupts.held():
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.05)
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.05)
    finally:
        signal.signal(signal.SIGINT, previous)
    assert calls == [signal.SIGINT, signal.SIGINT]


def test_fifos_and_devices_are_refused_not_replaced_or_waited_on(tmp_path, capsys):
    """Found by review: save and `compress -f` replaced a FIFO (a device
    node too) by a regular file, and inspect, verify, open and `extract -f`
    onto a FIFO waited for its other end for ever."""
    import threading

    ckpt = tmp_path / "c.jjpg"
    jaxjpeg.save(ckpt, {"w": np.ones((64, 64), np.float32)})
    src = tmp_path / "s.npz"
    np.savez(src, w=np.ones((64, 64), np.float32))
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    out = tmp_path / "tiles"
    out.mkdir()
    assert run(capsys, "extract", str(ckpt), str(out))[0] == 0
    (name,) = os.listdir(out)
    os.unlink(out / name)
    os.mkfifo(out / name)
    (tmp_path / "x").mkdir()
    os.mkfifo(tmp_path / "x" / "model.safetensors")
    answers = {}

    def attempt():
        answers["save"] = pytest.raises(OSError, jaxjpeg.save, fifo, {"w": np.ones(8, np.float32)})
        answers["open"] = pytest.raises(OSError, jaxjpeg.open, fifo)
        for command in (["compress", "-f", str(src), str(fifo)], ["inspect", str(fifo)],
                        ["verify", str(fifo)], ["extract", "-f", str(ckpt), str(out)],
                        ["export", "-f", str(ckpt), str(tmp_path / "x")]):
            answers[command[0]] = run(capsys, *command)

    worker = threading.Thread(target=attempt, daemon=True)
    worker.start()
    worker.join(60)   # a hang guard: each answer takes milliseconds
    assert not worker.is_alive(), f"still waiting after {sorted(answers)}"
    for what in ("save", "open"):
        assert "not a regular file" in str(answers[what].value), what
    for command in ("compress", "inspect", "verify", "extract", "export"):
        code, _, err = answers[command]
        assert code == EXIT_IO and "not a regular file" in err, (command, code, err)
    assert fifo.is_fifo() and (out / name).is_fifo()
    assert (tmp_path / "x" / "model.safetensors").is_fifo()


def test_a_fifo_is_refused_as_such_with_or_without_force(tmp_path, capsys):
    """compress said "exists (use --force to replace it)" of a FIFO (exit 2),
    then refused it with --force (exit 3); export refused it at once. Both
    refuse it at once now (review)."""
    ckpt = tmp_path / "c.jjpg"
    jaxjpeg.save(ckpt, {"w": np.ones((64, 64), np.float32)})
    os.mkfifo(tmp_path / "model.safetensors")
    os.mkfifo(tmp_path / "pipe")
    src = tmp_path / "s.npz"
    np.savez(src, w=np.ones((64, 64), np.float32))
    for command in (["export", str(ckpt), str(tmp_path / "model.safetensors")],
                    ["compress", str(src), str(tmp_path / "pipe")]):
        code, _, err = run(capsys, *command)
        assert code == EXIT_IO and "not a regular file" in err, (command, code, err)


def test_a_symlinks_parent_is_the_one_the_system_resolves(tmp_path, capsys, monkeypatch):
    """Found by review: the CLI cancelled ``lnk/..`` as text (abspath), so
    ``compress src lnk/../o.jjpg`` wrote ``./o.jjpg`` where ``open()`` and
    ``jaxjpeg.restore`` look in the parent of the link's target."""
    (tmp_path / "real" / "sub").mkdir(parents=True)
    (tmp_path / "work").mkdir()
    os.symlink(tmp_path / "real" / "sub", tmp_path / "work" / "lnk")
    monkeypatch.chdir(tmp_path / "work")
    np.savez("s.npz", w=np.ones((64, 64), np.float32))
    code, _, err = run(capsys, "compress", "s.npz", "lnk/../o.jjpg")
    assert code == 0, err
    assert (tmp_path / "real" / "o.jjpg").is_file() and not os.path.exists("o.jjpg")
    np.testing.assert_array_equal(np.asarray(jaxjpeg.restore("lnk/../o.jjpg")["w"]), 1)
    assert run(capsys, "inspect", "lnk/../o.jjpg")[0] == 0


def test_save_under_a_missing_directorys_parent_is_refused_before_coding(tmp_path):
    """Found by review: ``missing/../x.jjpg`` passed the directory check
    (abspath cancelled it), the tree was coded whole, then the rename failed
    naming the temporary file."""
    with pytest.raises(FileNotFoundError, match="cannot save: directory"):
        jaxjpeg.save(tmp_path / "missing" / ".." / "x.jjpg", {"w": np.ones((64, 64), np.float32)})
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("swap, signame", [(2, "SIGTERM"), (5, "SIGINT")])
def test_a_signal_while_held_swaps_handlers_leaves_the_callers_in_place(monkeypatch, swap,
                                                                        signame):
    """Found by review: a signal arriving during one of held()'s swaps ran
    the caller's handler inside signal.signal; where it raised (a training
    loop's preemption handler, the default Ctrl-C), the swap stopped half
    way and held()'s own catch-all stayed installed: later signals were
    swallowed for good. Simulated here: the signal is sent just before the
    Nth swap (installing SIGTERM's, restoring SIGTERM's)."""
    import signal
    from jaxjpeg import interrupts

    class Preempted(Exception):
        pass

    def preempt(signum, frame):
        raise Preempted()

    def interrupt(signum, frame):
        raise KeyboardInterrupt()

    previous = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    signal.signal(signal.SIGTERM, preempt)
    signal.signal(signal.SIGINT, interrupt)
    real, count = signal.signal, [0]

    def swapping(signum, handler):
        count[0] += 1
        if count[0] == swap:
            os.kill(os.getpid(), getattr(signal, signame))   # pending: runs inside the call
        return real(signum, handler)

    try:
        monkeypatch.setattr(signal, "signal", swapping)
        with pytest.raises((Preempted, KeyboardInterrupt)):
            with interrupts.held():
                pass
        monkeypatch.setattr(signal, "signal", real)
        assert signal.getsignal(signal.SIGTERM) is preempt
        assert signal.getsignal(signal.SIGINT) is interrupt
    finally:
        monkeypatch.setattr(signal, "signal", real)
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def test_a_dropped_signal_does_not_outlive_its_command(tmp_path):
    """Found by review: a dropped interruption (pending) stayed after the
    command failed for another reason, and every later library save then
    raised Terminated; a read-only command that had done its work exited
    143. Each command's pending signal ends with it."""
    import signal

    from jaxjpeg import interrupts
    handle = interrupts.ending_handler([])
    with pytest.raises(interrupts.Terminated):
        handle(signal.SIGTERM, None)   # raised where nothing took it: dropped
    assert main(["inspect", str(tmp_path / "missing.jjpg")]) != 0
    jaxjpeg.save(tmp_path / "after.jjpg", {"w": np.ones((4, 4), np.float32)})
    assert (tmp_path / "after.jjpg").exists()
    handle = interrupts.ending_handler([])
    with pytest.raises(interrupts.Terminated):
        handle(signal.SIGTERM, None)
    assert main(["inspect", str(tmp_path / "after.jjpg")]) == 0


def test_formats_not_read_are_usage_errors_naming_the_format(tmp_path, capsys):
    """Found by review: a legacy (pickled) torch.save, a pickle, a .npy or an
    .onnx file was "not a Flax msgpack, safetensors or jaxjpeg file, nor an
    Orbax directory (ExtraData)", exit 1 as if damaged, and a transformers
    index of PyTorch .bin shards "not a valid safetensors file"; a zip
    torch.save already said what to do, exit 2."""
    import json
    import pickle

    (tmp_path / "legacy.pt").write_bytes(pickle.dumps({"w": [1.0] * 64}, protocol=2))
    (tmp_path / "state.pkl").write_bytes(pickle.dumps({"w": [1.0] * 64}, protocol=5))
    np.save(tmp_path / "one.npy", np.ones((8, 8), np.float32))
    (tmp_path / "model.onnx").write_bytes(b"\x08\x07\x12\x07pytorch" + bytes(64))
    (tmp_path / "pytorch_model-00001-of-00001.bin").write_bytes(b"PK\x03\x04" + bytes(64))
    (tmp_path / "pytorch_model.bin.index.json").write_text(
        json.dumps({"weight_map": {"w": "pytorch_model-00001-of-00001.bin"}}))
    for name, words in [("legacy.pt", "a Python pickle"), ("state.pkl", "a Python pickle"),
                        ("one.npy", "one .npy array"), ("model.onnx", "an ONNX model"),
                        ("pytorch_model.bin.index.json", "indexes PyTorch files")]:
        assert main(["compress", str(tmp_path / name), str(tmp_path / "o.jjpg")]) == EXIT_USAGE
        err = capsys.readouterr().err
        assert words in err and "ExtraData" not in err, err
    assert not (tmp_path / "o.jjpg").exists()
    from flax import serialization   # a msgpack named .onnx is read (review: refused by name)
    (tmp_path / "flax.onnx").write_bytes(serialization.msgpack_serialize(
        {"w": np.ones((8, 8), np.float32)}))
    assert main(["compress", str(tmp_path / "flax.onnx"), str(tmp_path / "o.jjpg")]) == 0


def test_an_earlier_exports_shards_are_named_as_removed_not_written(tmp_path, capsys):
    """Found by review: after a sharded export, a one-file export to the same
    name said "my-00001-of-00003.safetensors: exists", a file it would
    remove, not write."""
    rng = np.random.default_rng(0)
    jaxjpeg.save(tmp_path / "c.jjpg", {f"w{i}": rng.standard_normal((128, 128)).astype(np.float32)
                                       for i in range(3)})
    out = str(tmp_path / "out" / "my.safetensors")
    (tmp_path / "out").mkdir()
    assert main(["export", str(tmp_path / "c.jjpg"), out, "--max-shard-size", "20KB"]) == 0
    capsys.readouterr()
    assert main(["export", str(tmp_path / "c.jjpg"), out]) == EXIT_USAGE
    assert "an earlier export this one would remove" in capsys.readouterr().err
    assert main(["export", str(tmp_path / "c.jjpg"), out, "--max-shard-size", "20KB"]) == EXIT_USAGE
    assert "exists (use --force to replace it)" in capsys.readouterr().err


def test_a_checkpoint_saved_among_shards_is_named_not_read_as_damage(tmp_path, capsys):
    """Found by review: `compress . small.safetensors` in a folder of shards
    wrote the checkpoint there; the next `compress .` said it was a broken
    safetensors file (exit 1)."""
    import json
    import struct

    header = json.dumps({"w": {"dtype": "F32", "shape": [64], "data_offsets": [0, 256]}}).encode()
    (tmp_path / "model-00001-of-00001.safetensors").write_bytes(
        struct.pack("<Q", len(header)) + header + np.ones(64, np.float32).tobytes())
    assert main(["compress", str(tmp_path), str(tmp_path / "small.safetensors")]) == 0
    capsys.readouterr()
    assert main(["compress", str(tmp_path), str(tmp_path / "again.jjpg")]) == EXIT_USAGE
    err = capsys.readouterr().err
    assert "small.safetensors: a jaxjpeg checkpoint, not a safetensors file" in err
