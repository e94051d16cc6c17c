"""Does ``torch.compile`` pay off for supernet training? Sandwich steps, eager against compiled.

Each optimizer step runs the largest, the smallest and ``--num-random`` random subnets of
``mobile_cifar`` (forward, distillation loss, backward), then one SGD step, as
:func:`dynas.supernet.train_supernet` does. The same steps (same subnets, same batches) run on one
supernet eagerly and on a copy under ``torch.compile``; the table gives seconds per step over the
first steps (compiling) and over the last ones (what a long run would settle to), and how many
graphs Dynamo compiled. A subnet is a new set of active sizes -- Python ints the forward branches
and slices on -- so every new subnet is a new graph until Dynamo's recompile limit sends the rest
to eager. Not in CI::

    python benchmarks/bench_supernet_compile.py --steps 12 --num-threads 1
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time

import torch
import torch.nn.functional as F

from dynas.supernet import Supernet
from dynas.supernet.train import sandwich
from search_spaces.mobile import MobileCifarSpace


def _steps(
    model: torch.nn.Module, supernet: Supernet, batches: list, steps: int, num_random: int, label: str
) -> list[float]:
    """Seconds of each sandwich step of ``model`` (``supernet`` or its compiled wrapper)."""
    optimizer = torch.optim.SGD(supernet.parameters(), lr=0.01, momentum=0.9, nesterov=True)
    times = []
    for step in range(steps):
        images, labels = batches[step % len(batches)]
        start = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        teacher = None
        for arch in sandwich(supernet, step, num_random):
            with supernet.activate(arch):
                logits = model(images)
                if teacher is None:
                    loss = F.cross_entropy(logits, labels)
                    teacher = logits.detach().softmax(dim=1)
                else:
                    loss = -(teacher * logits.log_softmax(dim=1)).sum(dim=1).mean()
                loss.backward()
        optimizer.step()
        times.append(time.perf_counter() - start)
        print(f"  {label} step {step + 1}: {times[-1]:.1f} s", flush=True)
    return times


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--num-random", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--input-size", type=int, default=16)
    parser.add_argument("--num-threads", type=int, default=None)
    parser.add_argument("--last", type=int, default=4, help="steps averaged as the settled rate")
    args = parser.parse_args(argv)
    if args.num_threads:
        torch.set_num_threads(args.num_threads)
    torch.manual_seed(0)
    supernet = Supernet(MobileCifarSpace(input_size=args.input_size)).train()
    twin = copy.deepcopy(supernet)
    gen = torch.Generator().manual_seed(0)
    batches = [
        (torch.randn(args.batch_size, 3, args.input_size, args.input_size, generator=gen),
         torch.randint(0, 10, (args.batch_size,), generator=gen))
        for _ in range(4)
    ]
    eager = _steps(supernet, supernet, batches, args.steps, args.num_random, "eager")
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    compiled = _steps(torch.compile(twin), twin, batches, args.steps, args.num_random, "compiled")
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    last = slice(-args.last, None)
    print(f"{args.steps} sandwich steps ({2 + args.num_random} subnets each), batch {args.batch_size}, "
          f"{args.input_size}x{args.input_size}, {torch.get_num_threads()} thread(s)")
    print(f"{'':<10}{'first step':>12}{'last ' + str(args.last) + ' (mean)':>16}{'all steps':>12}")
    for name, t in (("eager", eager), ("compiled", compiled)):
        print(f"{name:<10}{t[0]:>11.1f}s{statistics.fmean(t[last]):>15.2f}s{sum(t):>11.1f}s")
    ratio = statistics.fmean(compiled[last]) / statistics.fmean(eager[last])
    print(f"settled compiled / eager: {ratio:.2f}x; total {sum(compiled) / sum(eager):.1f}x; "
          f"graphs compiled: {graphs}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
