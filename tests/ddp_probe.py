"""torchrun target of test_training's DDP test: train_sft_vlm.py's main, with the buffer broadcasts that DDP makes
after its construction counted and printed by each rank (DDP sends buffers with torch.distributed's
_broadcast_coalesced, at construction and, with broadcast_buffers=True, before every forward)."""
import os
import sys

import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

import train_sft_vlm

broadcasts = {"constructed": False, "after_construction": 0}
broadcast_coalesced = dist._broadcast_coalesced
construct = DistributedDataParallel.__init__


def counted_broadcast(*args, **kwargs):
    broadcasts["after_construction"] += broadcasts["constructed"]
    return broadcast_coalesced(*args, **kwargs)


def counted_construct(self, *args, **kwargs):
    construct(self, *args, **kwargs)
    broadcasts["constructed"] = True


dist._broadcast_coalesced = counted_broadcast
DistributedDataParallel.__init__ = counted_construct

if __name__ == "__main__":
    train_sft_vlm.main(sys.argv[1:])
    print(f"rank {os.environ['RANK']}: {broadcasts['after_construction']} buffer broadcasts after DDP construction")
