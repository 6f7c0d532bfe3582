"""Fixes of session 29 outside the sweep, compare and transfer areas."""

from __future__ import annotations

import time

import imgclf
from imgclf.engine.callbacks import Callback
from imgclf.engine.trainer import Trainer

FAST = dict(tensorboard=False, final_eval=False, tta=False)


def test_the_progress_bar_figures_follow_slow_steps(small_sample, tmp_path, monkeypatch):
    # steps of over a second (a CPU fine-tune) left the bar's loss/acc/img_s 10 steps behind its count
    shown: list[int] = []
    real_bar = Trainer._bar

    def bar(self, epoch, start=0):
        b = real_bar(self, epoch, start)
        if b is not None:
            post = b.set_postfix

            def set_postfix(*a, **k):
                shown.append(self.step)
                return post(*a, **k)

            b.set_postfix = set_postfix
        return b

    class Slow(Callback):
        def on_step_end(self, t):
            time.sleep(1.05)

    monkeypatch.setattr(Trainer, "_bar", bar)
    res = imgclf.train(data=str(small_sample), epochs=1, batch_size=72, progress=True, callbacks=[Slow()],
                       project=str(tmp_path), name="slow", **FAST)
    assert len(res.history) == 1
    assert shown == [1, 2, 3, 4, 5]  # 360 images / 72: every step's figures, not steps 1 and 5 alone
