"""The one seam between prunetune and torch.distributed: ranks, devices, wrapping, collectives, data order.

No other module calls torch.distributed. A single process gets a :class:`Runtime` whose collectives do
nothing; under ``torchrun`` (or ``accelerate launch``, which starts processes the same way and sets the same
RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR variables) :meth:`Runtime.from_env` joins the process group
(NCCL on GPUs, gloo on CPUs), and the training loop wraps the model in DistributedDataParallel.

Data order: every rank draws the same seeded permutation of the training rows for an epoch (the one the
training DataLoader itself would draw), cuts it into
global micro-batches of ``batch_size x world_size`` rows, and takes its own contiguous share of each. A
single process with ``batch_size x world_size`` rows per micro-batch therefore sees exactly the rows all ranks
see together, and an epoch can be resumed at any micro-batch (the permutation depends on seed and epoch only).
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Iterable, Iterator

import torch
from torch import nn
from torch.utils.data import DataLoader, RandomSampler, Sampler

from prunetune.errors import PrunetuneError


class EpochBatches(Sampler[list[int]]):
    """The micro-batches of one rank in one epoch, from micro-batch `start` on (see the module docstring)."""

    def __init__(self, n: int, batch_size: int, *, shuffle: bool, seed: int, epoch: int, rank: int = 0,
                 world_size: int = 1, drop_last: bool = False, start: int = 0):
        self.n, self.batch_size, self.shuffle, self.seed, self.epoch = n, batch_size, shuffle, seed, epoch
        self.rank, self.world_size, self.drop_last, self.start = rank, world_size, drop_last, start

    def order(self) -> list[int]:
        if not self.shuffle:
            order = list(range(self.n))
        else:
            # The order a DataLoader(shuffle=True, generator=torch.Generator().manual_seed(seed)) gives in this
            # epoch, so that a single process trains on the very batches it always did: per epoch, that loader's
            # generator draws its iterator's base seed, the epoch's permutation, and one more permutation its
            # RandomSampler makes for the (empty) remainder. A generator of its own: the global RNG is left alone.
            # (tests/test_runstate.py checks the equality on each torch release.)
            g = torch.Generator().manual_seed(self.seed)
            for _ in range(self.epoch + 1):
                torch.empty((), dtype=torch.int64).random_(generator=g)
                perm = torch.randperm(self.n, generator=g)
                torch.randperm(self.n, generator=g)
            order = perm.tolist()
        if self.world_size > 1 and self.n % self.world_size:  # every rank gets as many rows (DistributedSampler)
            order += order[: self.world_size - self.n % self.world_size]
        return order

    def all_batches(self) -> list[list[int]]:
        order, chunk, out = self.order(), self.batch_size * self.world_size, []
        for i in range(0, len(order), chunk):
            rows = order[i:i + chunk]
            if self.drop_last and len(rows) < chunk:
                break
            share = len(rows) // self.world_size
            out.append(rows[self.rank * share:(self.rank + 1) * share])
        return out

    def per_epoch(self) -> int:
        rows = self.n + (-self.n % self.world_size if self.world_size > 1 else 0)
        chunk = self.batch_size * self.world_size
        return rows // chunk if self.drop_last else math.ceil(rows / chunk)

    def __iter__(self) -> Iterator[list[int]]:
        yield from self.all_batches()[self.start:]

    def __len__(self) -> int:
        return max(0, self.per_epoch() - self.start)


class TrainData:
    """The training batches of one rank, epoch by epoch, resumable at any micro-batch.

    A DataLoader is re-read through :class:`EpochBatches` (its dataset, batch size, collate function and
    whether it shuffles are kept); a list of ready batches is read in order (single process only).
    """

    def __init__(self, loader: Iterable[dict], runtime: Runtime, seed: int):
        self.loader, self.runtime = loader, runtime
        self.is_loader = isinstance(loader, DataLoader) and loader.batch_size is not None
        # the loader's own seed (make_loader seeds its generator with the run's seed), else the run's
        generator = getattr(loader, "generator", None)
        self.seed = generator.initial_seed() if generator is not None else seed
        if not self.is_loader and runtime.world_size > 1:
            raise PrunetuneError("data-parallel training needs a DataLoader (a list of batches cannot be sharded)")

    def _sampler(self, epoch: int, start: int) -> EpochBatches:
        loader = self.loader
        return EpochBatches(len(loader.dataset), loader.batch_size, shuffle=isinstance(loader.sampler, RandomSampler),
                            seed=self.seed, epoch=epoch, rank=self.runtime.rank, world_size=self.runtime.world_size,
                            drop_last=loader.drop_last, start=start)

    def per_epoch(self) -> int:
        """Micro-batches per epoch on each rank."""
        return self._sampler(0, 0).per_epoch() if self.is_loader else len(self.loader)

    def epoch(self, epoch: int, start: int = 0) -> Iterable[dict]:
        if not self.is_loader:
            return list(self.loader)[start:]
        loader = self.loader
        # its own generator: creating a loader's iterator otherwise draws a seed from the global RNG, which a
        # resumed run would draw at another moment than the run it continues
        return DataLoader(loader.dataset, batch_sampler=self._sampler(epoch, start), collate_fn=loader.collate_fn,
                          num_workers=loader.num_workers, pin_memory=loader.pin_memory,
                          generator=torch.Generator())


class Runtime:
    """This process's rank, world size and device, and the few collectives the loop needs."""

    def __init__(self, *, rank: int = 0, world_size: int = 1, local_rank: int = 0,
                 device: torch.device | None = None, owns_group: bool = False):
        self.rank, self.world_size, self.local_rank = rank, world_size, local_rank
        self.device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.owns_group = owns_group

    @classmethod
    def single(cls, device: torch.device | None = None) -> Runtime:
        return cls(device=device)

    @classmethod
    def from_env(cls) -> Runtime:
        """A single process, or this rank of a torchrun / accelerate launch job (joining its process group)."""
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world <= 1:
            return cls.single()
        import torch.distributed as dist

        local = int(os.environ.get("LOCAL_RANK", "0"))
        cuda = torch.cuda.is_available()
        device = torch.device("cuda", local) if cuda else torch.device("cpu")
        if cuda:
            torch.cuda.set_device(device)
        owns = not dist.is_initialized()
        if owns:
            dist.init_process_group("nccl" if cuda else "gloo")
        return cls(rank=dist.get_rank(), world_size=dist.get_world_size(), local_rank=local, device=device,
                   owns_group=owns)

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """The rank that selects plans and writes files."""
        return self.rank == 0

    def close(self) -> None:
        if self.owns_group:
            import torch.distributed as dist

            dist.destroy_process_group()
            self.owns_group = False

    # -- the model ------------------------------------------------------------------------------------

    def wrap(self, model: nn.Module) -> nn.Module:
        """DistributedDataParallel around `model` (itself in a single process). DDP fixes the parameters when it
        is built and broadcasts rank 0's values: after a structure change, build it again (release the old one)."""
        if not self.distributed:
            return model
        from torch.nn.parallel import DistributedDataParallel

        ids = [self.device.index] if self.device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=ids)

    @staticmethod
    def release(wrapped: nn.Module) -> None:
        """Detach a wrapper's gradient hooks from the parameters it shares with the next one."""
        remove = getattr(wrapped, "_remove_autograd_hooks", None)
        if remove is not None:
            remove()

    @staticmethod
    def wrappers_of(model: nn.Module) -> list[nn.Module]:
        """The DistributedDataParallel modules around `model` that someone else built and holds (the transformers
        Trainer, through accelerate, never hands its wrapper out). Looked for among the live objects: only when
        the structure changed, a few times a run."""
        import gc

        from torch.nn.parallel import DistributedDataParallel

        return [o for o in gc.get_objects() if isinstance(o, DistributedDataParallel) and o.module is model]

    def rebuild_in_place(self, wrapped: nn.Module) -> None:
        """Build a DistributedDataParallel wrapper again on its module's parameters now, as the same object (its
        holder keeps calling it): after a structure change its buckets and gradient hooks point at tensors that are
        gone. Its settings are kept; a communication hook registered on it is not."""
        from torch.nn.parallel import DistributedDataParallel

        self.release(wrapped)
        settings = {"device_ids": wrapped.device_ids, "output_device": wrapped.output_device, "dim": wrapped.dim,
                    "forward_sync_buffers": wrapped.forward_sync_buffers, "process_group": wrapped.process_group,
                    "bucket_cap_mb": wrapped.bucket_bytes_cap / 2**20,
                    "find_unused_parameters": wrapped.find_unused_parameters,
                    "gradient_as_bucket_view": wrapped.gradient_as_bucket_view, "static_graph": wrapped.static_graph}
        DistributedDataParallel.__init__(wrapped, wrapped.module, **settings)

    def no_sync(self, wrapped: nn.Module, skip: bool):
        """No gradient all-reduce for this backward (`skip`: a micro-batch before the last of an accumulation)."""
        if skip and self.distributed:
            return wrapped.no_sync()
        return contextlib.nullcontext()

    # -- collectives ----------------------------------------------------------------------------------

    def mean(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Each tensor averaged over the ranks (every rank gets the result)."""
        if not self.distributed:
            return tensors
        import torch.distributed as dist

        out = {}
        for key in sorted(tensors):  # the same order on every rank
            t = tensors[key].detach().to(self.device, copy=True)
            dist.all_reduce(t)
            out[key] = (t / self.world_size).to(tensors[key].device)
        return out

    def broadcast(self, obj):
        """The main rank's `obj` on every rank."""
        if not self.distributed:
            return obj
        import torch.distributed as dist

        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def gather(self, obj) -> list:
        """Every rank's `obj`, in rank order, on every rank."""
        if not self.distributed:
            return [obj]
        import torch.distributed as dist

        out = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def barrier(self) -> None:
        if self.distributed:
            import torch.distributed as dist

            dist.barrier()
