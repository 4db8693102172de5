import time, torch, sys, json
from lowbit.kernels import fast
from lowbit.workflows.bench_kernels import FORMATS, make_format_weight
torch.set_num_threads(2)
out = {}
for k, n in [(4096, 4096), (768, 3072)]:
    x = torch.randn(197, k)
    for f in ("int8", "int4_g128", "int4_g32", "int8_rowact", "int4_g128_rowact"):
        s = FORMATS[f]
        h = fast.prepare(make_format_weight(k, n, s), act_block=s.act_block)
        for _ in range(3): fast.linear(x, h)
        ts = []
        for _ in range(15 if k == 768 else 7):
            t = time.perf_counter(); fast.linear(x, h); ts.append(time.perf_counter() - t)
        ts.sort(); out[f"{k}x{n} {f}"] = ts[len(ts) // 2] * 1e3
print(json.dumps(out))
