"""Worker for tests/test_ddp.py: run one real stage (`nanochat_one.py --stage ...`) as one rank of
a torchrun job, then save the weights this rank ended with to OUT/weights_rank<r>.pt, so the test
can check that every rank holds the same model and that rank 0's checkpoint is that model.

    torchrun --standalone --nproc_per_node=2 tests/stage_worker.py OUT --stage mid ...flags
"""
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import nanochat_one as nc  # noqa: E402

out, argv = Path(sys.argv[1]), sys.argv[2:]
models, wrap_ddp = [], nc.wrap_ddp
nc.wrap_ddp = lambda model, ddp: models.append(model) or wrap_ddp(model, ddp)  # the model each stage trains
nc.run(argv)  # as the CLI: parse, check the flags, seed, join torchrun's process group, run the stage
rank = torch.distributed.get_rank()
torch.save({k: v.detach().cpu() for k, v in models[-1].state_dict().items()}, out / f"weights_rank{rank}.pt")
torch.distributed.destroy_process_group()
