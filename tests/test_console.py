"""The console filter drops Ray's known notices from fd 2 and nothing else, even when the process dies hard."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

from tests.conftest import ROOT

NOTICE = ("[2026-12-03 16:38:10,582 E 4079 4079] core_worker.cc:2465: Actor with class name: "
          "'MapWorker(MapBatches(_ActorStage))' and ID: 'ec17e3' has constructor arguments in the object store and "
          "max_restarts > 0. If the arguments in the object store go out of scope or are lost, the actor restart "
          "will fail. See https://github.com/ray-project/ray/issues/53727 for more details.")


def _run(body: str, **env: str) -> subprocess.CompletedProcess:
    # Ctrl-C as at a terminal: a shell's background job (a CI runner's, say) starts with SIGINT ignored,
    # and Python then leaves it ignored in this process and in the filter it starts.
    script = textwrap.dedent("""
        import os, signal, sys
        signal.signal(signal.SIGINT, signal.default_int_handler)
        from pipeline.console import filter_stderr
        filter_stderr()
    """) + textwrap.dedent(body)
    # A session of its own: one test signals its whole process group, which must not include pytest.
    return subprocess.run([sys.executable, "-c", script], capture_output=True, timeout=60, start_new_session=True,
                          env={**os.environ, "PYTHONPATH": str(ROOT), **env})


def test_the_notice_is_dropped_and_every_other_line_kept_in_order():
    proc = _run(f"""
        os.write(2, b"first line\\n")
        os.write(2, {NOTICE.encode()!r} + b"\\n")
        os.write(2, b"[2026-12-03 16:38:11,000 E 1 1] core_worker.cc:99: a real error\\n")
        sys.stderr.write("progress 1/2\\r")
        sys.stderr.flush()
        os.write(2, b"[unterminated")
    """)
    assert proc.returncode == 0
    err = proc.stderr.decode()
    assert "constructor arguments" not in err
    assert err == ("first line\n[2026-12-03 16:38:11,000 E 1 1] core_worker.cc:99: a real error\n"
                   "progress 1/2\r[unterminated")


def test_lines_written_just_before_a_native_abort_still_arrive():
    proc = _run("""
        sys.stderr.write("why it died\\n")
        sys.stderr.flush()
        os.abort()
    """)
    assert proc.returncode < 0  # killed by SIGABRT
    assert proc.stderr.decode() == "why it died\n"


def test_it_can_be_turned_off():
    proc = _run(f"os.write(2, {NOTICE.encode()!r} + b'\\n')", SPLINTER_RAY_NOTICES="1")
    assert proc.stderr.decode() == NOTICE + "\n"


def test_ctrl_c_to_the_process_group_does_not_cut_the_console_off():
    # The filter sits in the same process group: a SIGINT to the group must not silence the driver's
    # own stop line.
    proc = _run("""
        import signal, time
        try:
            os.killpg(os.getpgrp(), signal.SIGINT)
            time.sleep(5)
        except KeyboardInterrupt:
            sys.stderr.write("stopped by SIGINT\\n")
            sys.exit(130)
    """)
    assert proc.returncode == 130
    assert proc.stderr.decode() == "stopped by SIGINT\n"
