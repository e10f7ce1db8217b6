"""Every learner on CUDA against the same learner on the CPU. Prints a table; needs a GPU.

For each registered learner, on its tour family and options (``metalens tour``'s plan):

- the meta-loss and meta-gradient of one episode at the same initial weights, on the
  CPU and on CUDA (float32 both; TF32 off so that the comparison measures our code,
  not the GPU's reduced-precision matrix units): relative error of the loss and of the
  gradient vector;
- ``evaluate`` on 50 held-out tasks after those identical weights, both devices;
- milliseconds per meta-training step on each device (median of ``--steps`` steps
  after 3 warm-up steps), with the tour's batch size.

Run on a machine with a GPU: ``python benchmarks/cuda_check.py [--steps 20] [--learners maml cnp]``
(``PYTHONPATH=src`` is enough where metalens is not installed). Exit status 1 if a
relative error exceeds ``--tol`` (default 1e-3).
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time

import torch


def _flat_grad(learner) -> torch.Tensor:
    return torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1).double().cpu()
                      for p in learner.parameters() if p.requires_grad])


def _loss_and_grad(learner, episode, device: str, seed: int):
    from metalens import rng

    learner.zero_grad(set_to_none=True)
    gen = rng.generator(seed, rng.Stream.LEARNER, 0, device=device)
    loss, _ = learner.meta_loss(episode.to(device), generator=gen)
    loss.backward()
    return float(loss.detach()), _flat_grad(learner)


def _step_ms(learner, family, batch: int, device: str, steps: int) -> float:
    from metalens import rng
    from metalens.train import TrainConfig, make_optimizer

    opt = make_optimizer(learner, TrainConfig(lr=1e-4))
    times = []
    for step in range(steps + 3):
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        t = time.perf_counter()
        ep = family.episode(1, step, batch).to(device)
        gen = rng.generator(1, rng.Stream.LEARNER, step, device=device)
        loss, _ = learner.meta_loss(ep, generator=gen)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        if step >= 3:
            times.append(time.perf_counter() - t)
    return 1000 * statistics.median(times)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--learners", nargs="*", help="learners to check (default: every registered one)")
    ap.add_argument("--steps", type=int, default=20, help="timed training steps per device")
    ap.add_argument("--tol", type=float, default=1e-3, help="largest relative error accepted")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--no-omniglot", dest="omniglot", action="store_false",
                    help="skip the Conv-4 cases on Omniglot 5-way 1-shot (they need the Omniglot data)")
    args = ap.parse_args()
    if not torch.cuda.is_available() and args.device.startswith("cuda"):
        print("cuda_check: no CUDA device on this machine", file=sys.stderr)
        return 2
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.set_num_threads(1)

    import metalens
    from metalens.evaluate import evaluate
    from metalens.experiments.recipes import TOUR
    from metalens.registry import LEARNERS

    names = args.learners or [e.name for e in LEARNERS]
    print(f"torch {torch.__version__}, {torch.cuda.get_device_name(0) if args.device.startswith('cuda') else ''}")
    print("| learner | family | loss rel err | grad rel err | eval metric | cpu | cuda | cpu ms/step | cuda ms/step |")
    print("|---|---|---|---|---|---|---|---|---|")
    worst = 0.0
    cases = [(n, TOUR[n].task, TOUR[n].task_options, TOUR[n].learner_options,
              int(TOUR[n].train.get("batch_tasks", 25))) for n in names if n in TOUR]
    if args.omniglot:  # the Conv-4 backbone with its per-task batch norm, on real images
        conv = {"backbone": "conv4"}
        five = {"ways": 5, "shots": 1, "queries": 15}
        cases += [(n, "omniglot", five, {**conv, **extra}, 8) for n, extra in
                  (("maml", {"inner_lr": 0.4}), ("fomaml", {"inner_lr": 0.4}), ("protonet", {}),
                   ("matching", {})) if n in names]
    for name, task, task_opts, learner_opts, batch in cases:
        family = metalens.make_task(task, **task_opts)
        cpu = metalens.make_learner(name, family, seed=0, **learner_opts)
        gpu = copy.deepcopy(cpu).to(args.device)
        label = "omniglot conv4" if task == "omniglot" else task
        ep = family.episode(0, 0, batch)
        if cpu.trainable:
            l_c, g_c = _loss_and_grad(cpu, ep, "cpu", 0)
            l_g, g_g = _loss_and_grad(gpu, ep, args.device, 0)
            loss_err = abs(l_c - l_g) / max(abs(l_c), 1e-12)
            grad_err = float((g_c - g_g).norm() / g_c.norm().clamp_min(1e-12))
        else:
            loss_err = grad_err = 0.0
        split = {"split": "test"} if task == "omniglot" else {}
        ev_c = evaluate(cpu, family, episodes=50, seed=0, with_oracle=False, **split)
        ev_g = evaluate(gpu, family, episodes=50, seed=0, with_oracle=False, device=args.device, **split)
        metric = "accuracy" if "accuracy" in ev_c.metrics else "mse"
        m_c, m_g = ev_c.metrics[metric].mean, ev_g.metrics[metric].mean
        eval_err = abs(m_c - m_g) / max(abs(m_c), 1e-12)
        # stochastic learners (lnp, anp) draw z from a generator per device: CPU and CUDA streams differ
        stochastic = name in ("lnp", "anp")
        worst = max(worst, grad_err if not stochastic else 0.0, loss_err if not stochastic else 0.0,
                    eval_err if not stochastic else 0.0)
        ms_c = _step_ms(cpu, family, batch, "cpu", args.steps) if cpu.trainable else float("nan")
        ms_g = _step_ms(gpu, family, batch, args.device, args.steps) if cpu.trainable else float("nan")
        note = " (z draws differ by device)" if stochastic else ""
        print(f"| {name}{note} | {label} | {loss_err:.1e} | {grad_err:.1e} | {metric} | {m_c:.4f} | {m_g:.4f} | "
              f"{ms_c:.1f} | {ms_g:.1f} |", flush=True)
    print(f"largest relative error (deterministic learners): {worst:.2e} (tolerance {args.tol:g})")
    return 0 if worst <= args.tol else 1


if __name__ == "__main__":
    sys.exit(main())
