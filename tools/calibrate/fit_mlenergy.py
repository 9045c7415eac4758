#!/usr/bin/env python3
"""Fits the constants of tokenfab's step-time and power model (crates/tokenfab-core/src/perf.rs)
to the ML.ENERGY Leaderboard v3 measurements of Llama-3.1-8B on 1x H100 and Llama-3.1-70B on
4x H100 (ml-energy/leaderboard public/data/models/*__lm-arena-chat.json, commit 0cd52da, data
2026-02-16; vLLM with max_num_seqs = batch, NVML energy via Zeus, steady state).

Needs numpy and scipy (`pip install numpy scipy`). Prints the fitted constants (copy them into
[calibration] of crates/tokenfab-core/data/catalog.toml) and the error on every row.

Model, per device of a tp-way replica, for one engine step at steady state:
  t_mem = (weights/tp + kv_tokens*kv_bytes/tp) / (peak_bw * eta_bw)
  t_cmp = (2*params/tp*tokens + 4*layers*heads*head_dim*kv_tokens/tp) / (peak_flops * eta_f)
  t_oth = t_seq*batch + allreduce (tp>1: 2*layers*(10us + tokens*hidden*2/link_bw))
  t     = t_mem + t_cmp + t_oth
  P     = P_idle + (k*(p_mem*t_mem + p_cmp*t_cmp) + p_oth*t_oth) / t,   k = 1 (tp=1) or k_tp
Assumption: mean prompt 200 tokens (the data set does not publish it); mean output per model
as published (395 for 8B, 352 for 70B). Each step: `batch` decode tokens plus batch*prompt/output
prefill tokens; mean context prompt + output/2.
"""
import numpy as np
from scipy.optimize import least_squares

# (max_num_seqs, output tokens/s, W per GPU)
LLAMA8_H100 = [(8, 1070, 486), (16, 1954, 513), (32, 3391, 560), (64, 5147, 610), (96, 6260, 644),
               (128, 7037, 669), (192, 8223, 688), (256, 9010, 691), (384, 9248, 687), (512, 9806, 688)]
LLAMA70_4XH100 = [(8, 470, 441), (16, 863, 451), (32, 1487, 449), (64, 2511, 500), (128, 3876, 546),
                  (256, 4915, 589), (512, 5921, 623), (1024, 6827, 637)]
M8 = dict(W=16.1e9, A=8.03e9, L=32, H=32, hd=128, kvb=131072, out=395, hidden=4096)
M70 = dict(W=141e9, A=70.6e9, L=80, H=64, hd=128, kvb=327680, out=352, hidden=8192)
BW, FLOPS, P_IDLE, LINK = 3.35e12, 989e12, 70.0, 450e9   # H100 datasheet; idle measured 70 W
PROMPT = 200
CASES = [(LLAMA8_H100, M8, 1), (LLAMA70_4XH100, M70, 4)]


def phases(m, b, tp, xt):
    eta_bw, eta_f, t_step, t_seq = xt
    ptok = b * PROMPT / m['out']
    ctx = b * (PROMPT + m['out'] / 2)
    t_mem = (m['W'] / tp + ctx * m['kvb'] / tp) / (BW * eta_bw)
    t_cmp = (2 * m['A'] / tp * (b + ptok) + 4 * m['L'] * m['H'] * m['hd'] * ctx / tp) / (FLOPS * eta_f)
    allreduce = 0 if tp == 1 else 2 * m['L'] * (10e-6 + (b + ptok) * m['hidden'] * 2 / LINK)
    return t_mem, t_cmp, t_step + t_seq * b + allreduce


def time_residuals(xt, show=False):
    res = []
    for rows, m, tp in CASES:
        for b, tok, _ in rows:
            t = sum(phases(m, b, tp, xt))
            res.append(np.log(b / t / tok))
            if show:
                print(f"  tp{tp} batch {b:5d}: {b / t:7.0f} tok/s vs {tok:6d} measured ({(b / t / tok - 1) * 100:+5.1f}%)")
    return np.array(res)


def power_residuals(xp, xt, show=False):
    p_mem, p_cmp, p_oth, k_tp = xp
    res = []
    for rows, m, tp in CASES:
        for b, tok, w in rows:
            tm, tc, to = phases(m, b, tp, xt)
            k = 1.0 if tp == 1 else k_tp
            p = P_IDLE + (k * (p_mem * tm + p_cmp * tc) + p_oth * to) / (tm + tc + to)
            res.append(np.log(p / w))
            if show:
                jt, jm = p * tp * (tm + tc + to) / b, w * tp / tok
                print(f"  tp{tp} batch {b:5d}: {p:5.0f} W vs {w} ({(p / w - 1) * 100:+5.1f}%), "
                      f"J/token {jt:.4f} vs {jm:.4f} ({(jt / jm - 1) * 100:+5.1f}%)")
    return np.array(res)


xt = least_squares(time_residuals, [0.7, 0.4, 1e-3, 2e-5], bounds=([0.3, 0.05, 0, 0], [0.92, 0.8, 0.02, 1e-3])).x
xp = least_squares(lambda x: power_residuals(x, xt), [400, 600, 100, 0.8],
                   bounds=([0, 0, 0, 0.3], [1000, 1000, 1000, 1.5])).x
print("[calibration]")
print(f"bandwidth_efficiency = {xt[0]:.4f}")
print(f"flop_efficiency = {xt[1]:.4f}")
print(f"per_step_overhead_us = {xt[2] * 1e6:.2f}")
print(f"per_sequence_overhead_us = {xt[3] * 1e6:.2f}")
print(f"memory_phase_power_w = {xp[0]:.1f}")
print(f"compute_phase_power_w = {xp[1]:.1f}")
print(f"other_phase_power_w = {xp[2]:.1f}")
print(f"tensor_parallel_power_factor = {xp[3]:.4f}")
print("\nthroughput:")
rt = time_residuals(xt, True)
print("power and energy:")
rp = power_residuals(xp, xt, True)
print(f"\nrms error: throughput {np.sqrt(np.mean(rt ** 2)) * 100:.1f}%, power {np.sqrt(np.mean(rp ** 2)) * 100:.1f}%")
