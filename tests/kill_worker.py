"""Worker for tests/test_resume.py: run one stage of nanochat_one.py through its CLI and SIGKILL
this process in the middle of the step after the checkpoint of step KILL_AFTER is complete.

    python tests/kill_worker.py KILL_AFTER [--fake-reward] -- nanochat_one.py's flags

The kill comes from the next forward pass of the model after that checkpoint: the first
micro-batch of the next training step, or the first sampled token of the next RL step. So the
process dies with a step half done, as under `kill -9` or the out-of-memory killer. With
--fake-reward the RL grader is replaced by test_resume.fake_reward (see there)."""
import os
import signal
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import nanochat_one as nc  # noqa: E402

kill_after = int(sys.argv[1])
flags = sys.argv[sys.argv.index("--") + 1:]
if "--fake-reward" in sys.argv[:sys.argv.index("--")]:
    import test_resume  # noqa: E402
    nc.answer_is_correct = test_resume.fake_reward
save_checkpoint, forward = nc.save_checkpoint, nc.GPT.forward


def save_then_arm(directory, step, *args, **kwargs):
    save_checkpoint(directory, step, *args, **kwargs)
    if step == kill_after:
        nc.GPT.forward = lambda *a, **k: os.kill(os.getpid(), signal.SIGKILL)


nc.save_checkpoint = save_then_arm
nc.main(flags)
