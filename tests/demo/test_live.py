"""The demo's live view: a note above the progress, on a terminal and in a log."""

from __future__ import annotations

import io

from order_monitor.demo.live import LiveView, Snapshot

SNAP = Snapshot(1.0, 10, 5, 5, 0, 0, 0, 3.0, 3.0, 2, 0.0, 4, 1, 0.5, 0.0)


def test_a_note_in_a_log_is_a_line_of_its_own() -> None:
    out = io.StringIO()
    view = LiveView(out, "header", tty=False)
    view.start()
    view.note("The operator page: http://127.0.0.1:1/")
    view.update(SNAP)
    lines = out.getvalue().splitlines()
    assert lines[:2] == ["header", "The operator page: http://127.0.0.1:1/"]
    assert lines[2].startswith("[  1.0s] dispatched 5/10")


def test_a_note_on_a_terminal_clears_the_frame_and_the_next_one_is_drawn_below() -> None:
    out = io.StringIO()
    view = LiveView(out, "header", tty=True)
    view.start()
    view.update(SNAP)
    frame = len(view.frame(SNAP))
    view.note("note")
    view.update(SNAP)
    text = out.getvalue()
    cleared = f"\x1b[{frame}A\r\x1b[J"
    assert cleared in text
    after = text.split(cleared, 1)[1]
    # The note, then the frame drawn afresh (no cursor-up before it).
    assert after.startswith("note\n\r\x1b[2K")
    assert f"\x1b[{frame}A" not in after
