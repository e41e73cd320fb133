"""``scanopt bench``: side-by-side microbenchmarks, committed results, plots.

How to run (on a CUDA GPU; without one ``scanopt bench`` says so and exits with status 1)::

    scanopt bench --op attention --quick          # SDPA backends etc., L = 1024 and 4096
    scanopt bench --save                          # every op, every provider found, full sweep
    scanopt bench --op wkv7 --L 2048,8192 --dtype bf16,fp16 --providers scanopt,fla
    scanopt bench --list                          # which providers load here, and why not
    scanopt bench --ceilings                      # (re)measure copy GB/s and bf16 matmul TFLOP/s
    scanopt bench report                          # bench/README.md + bench/plots/*.png (any machine)

Options: ``--op`` ops (attention, selective_scan, ssd, state_update, wkv4, wkv6, wkv7; default
all); ``--L`` sequence lengths (default 1024..16384 at batch 4, d_model 2048, as ANCHORS.md; the
decode step sweeps batch 1..64 instead); ``--dtype`` bf16/fp16/fp32 (default bf16); ``--quick``
L=1024,4096; ``--providers`` a subset by name; ``--directions`` fwd, bwd, fwd+bwd;
``--format`` github (default), plain, csv or json; ``--save`` upserts rows into
``bench/results/<GPU_SLUG>/<op>.csv`` (``--results-dir`` to change); ``--ceilings`` re-measures the
GPU ceilings cached in the user cache dir (measured automatically on first use); ``--cudagraph``
/ ``--no-cudagraph`` CUDA-graph timing of forwards (default: decode step only); ``--no-verify``
skips verification; ``--warmup`` / ``--rep`` do_bench times in ms; ``--seed``; ``--rwkv-lm`` an
adapter exposing RWKV-LM's compiled kernels (see :mod:`scanopt.bench.rwkv_lm`).

How providers are found: each is imported lazily on first use and skipped with a note when it
cannot load. ``scanopt`` = the public functions (``scanopt.selective_scan_fn``, ``wkv4``, ...);
``torch`` = scanopt's PyTorch path (``SCANOPT_BACKEND=torch``), else a plain PyTorch formula
(loops only up to L=2048); ``sdpa-cudnn|flash|efficient|math`` =
``F.scaled_dot_product_attention`` under ``torch.nn.attention.sdpa_kernel`` (math only where the
score matrix fits in memory); ``mamba_ssm`` = ``selective_scan_fn`` (needs the CUDA extension
``selective_scan_cuda``), ``mamba_chunk_scan_combined``, ``selective_state_update``; ``fla`` =
``fused_recurrent_rwkv4``, ``chunk_rwkv6``, ``chunk_rwkv7``; ``flash_attn`` = ``flash_attn_func``;
``rwkv-lm`` = ``--rwkv-lm ADAPTER``.

What a row means: median ms with p20/p80 of ``triton.testing.do_bench`` (L2 flushed, inputs
rotated across copies, after an untimed warm-up/verification call); TFLOP/s (attention) or GB/s
(scans) from the formulas in :mod:`scanopt.bench.formulas`; % of this GPU's measured ceiling;
the relative error of the provider's outputs and gradients against a float64 reference
(:mod:`scanopt.bench.runner` says which: NumPy, float64 PyTorch on the GPU, or a trusted provider
in float32); ``verified`` ok / self / FAILED / skipped. FAILED rows never appear as speedups.

Modules: ``timing`` (do_bench, rotation, ceilings), ``formulas`` (FLOPs, bytes), ``registry``
(cases, providers, suites), ``suites/`` (one per op family), ``eager`` (plain PyTorch formulas),
``runner`` (verify + time), ``checks`` (the verify rule on the device), ``results`` (rows, CSV
upsert), ``table`` (terminal tables), ``report`` (README and plots), ``cli``.
Nothing here runs at import; torch, triton, tabulate, tqdm and matplotlib load when used.
"""
