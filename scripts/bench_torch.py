#!/usr/bin/env python3
"""PyTorch timings of the bench table's workloads (examples/bench.rs), as `name ms` lines.

    python3 scripts/bench_torch.py > torch.txt
    KILN_TORCH=torch.txt cargo run --release --example bench

fp32 with TF32 off; each workload runs to completion (cuda.synchronize) after warm-up, and the
median of the repetitions is printed. Uses the GPU when there is one, else the CPU.
"""
import time

import torch
import torch.nn.functional as F
from torch import nn

torch.backends.cuda.matmul.allow_tf32 = False
torch.backends.cudnn.allow_tf32 = False
dev = "cuda" if torch.cuda.is_available() else "cpu"
sync = torch.cuda.synchronize if dev == "cuda" else (lambda: None)
reps = 20 if dev == "cuda" else 3


def median_ms(f):
    for _ in range(3):
        f()
    sync()
    v = []
    for _ in range(reps):
        t = time.perf_counter()
        f()
        sync()
        v.append((time.perf_counter() - t) * 1e3)
    v.sort()
    return v[len(v) // 2]


def out(name, ms):
    print(f"{name} {ms:.4f}", flush=True)


full = dev == "cuda"
for n in ([256, 1024, 4096] if full else [128, 256]):
    a = torch.randn(n, n, device=dev)
    b = torch.randn(n, n, device=dev)
    out(f"matmul {n}", median_ms(lambda: a @ b))
    out(f"matmul {n} b^T", median_ms(lambda: a @ b.t()))
for (m, k, n) in [(256, 784, 512), (256, 512, 512), (256, 512, 10)]:
    x = torch.randn(m, k, device=dev)
    w = torch.randn(n, k, device=dev)
    out(f"linear {k}->{n} batch {m}", median_ms(lambda: x @ w.t()))

cb, cc, cs = (64, 64, 56) if full else (2, 16, 28)
x = torch.randn(cb, cc, cs, cs, device=dev)
w = torch.randn(cc, cc, 3, 3, device=dev) * 0.05
out("conv2d fwd", median_ms(lambda: F.conv2d(x, w, padding=1)))
xg = x.clone().requires_grad_()
wg = w.clone().requires_grad_()


def conv_fb():
    F.conv2d(xg, wg, padding=1).sum().backward()
    xg.grad = None
    wg.grad = None


out("conv2d fwd+bwd", median_ms(conv_fb))
n = (64 << 20) if full else (1 << 20)
a = torch.randn(n, device=dev)
b = torch.randn(n, device=dev)
out("add", median_ms(lambda: a + b))
rows = a.reshape(-1, 1024)
out("sum rows of 1024", median_ms(lambda: rows.sum(-1)))


def mlp():
    return nn.Sequential(nn.Linear(784, 512), nn.ReLU(), nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, 10))


def cnn():
    return nn.Sequential(nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(),
                         nn.MaxPool2d(2), nn.Flatten(), nn.Linear(3136, 128), nn.ReLU(), nn.Linear(128, 10))


for name, make, shape in [("mlp", mlp, (784,)), ("cnn", cnn, (1, 28, 28))]:
    for batch in ([64, 256] if full else [64]):
        model = make().to(dev)
        opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
        x = torch.randn(batch, *shape, device=dev)
        t = (torch.arange(batch, device=dev) % 10)

        def step():
            loss = F.cross_entropy(model(x), t)
            opt.zero_grad()
            loss.backward()
            opt.step()

        out(f"train step {name} batch {batch}", median_ms(step))
        model.eval()
        with torch.no_grad():
            out(f"eval forward {name} batch {batch}", median_ms(lambda: model(x)))
            out(f"inference {name} batch {batch}", median_ms(lambda: model(x)))
