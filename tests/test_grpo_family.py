"""The GRPO family of grpo/loss.py checked against TRL 1.16's own `GRPOTrainer._compute_loss` on fixed arrays.

How TRL is called: `object.__new__(GRPOTrainer)` gives a trainer with no __init__ run (no model, no dataset); we set
only the attributes `_compute_loss` reads (loss type, epsilons, beta, args.delta, ...), a single-process
accelerator stub (gather / reduce / pad_across_processes are the identity, as on one process), and replace its
model-forward helper `_get_per_token_logps_and_entropies` by one returning our fixed per-token log-probs and
entropies as torch leaves with requires_grad. `loss.backward()` then gives TRL's gradient w.r.t. the per-token
log-probs (and entropies), compared with `jax.grad` of `grpo_loss` w.r.t. the same arrays.
"""

import collections
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from trl.trainer.grpo_trainer import GRPOTrainer

from grpo.loss import LOSS_TYPES, SAMPLER_IS_MODES, grpo_loss, sampler_is_weights

B, C = 8, 6
TOL = dict(atol=1e-5, rtol=1e-5)


def _arrays(seed=0):
    rng = np.random.default_rng(seed)
    lengths = np.array([6, 1, 4, 6, 0, 3, 5, 2])  # one empty row
    mask = (np.arange(C)[None, :] < lengths[:, None]).astype(np.float32)
    logp = -rng.uniform(0.1, 3.0, size=(B, C)).astype(np.float32)
    old = (logp + rng.normal(size=(B, C)) * 0.3).astype(np.float32)  # some ratios fall outside the clip range
    ref = (logp + rng.normal(size=(B, C)) * 0.5).astype(np.float32)
    sampler = (old + rng.normal(size=(B, C)) * 0.4).astype(np.float32)
    ent = rng.uniform(0.0, 2.0, size=(B, C)).astype(np.float32)
    adv = rng.normal(size=B).astype(np.float32)
    return dict(logp=logp, old=old, ref=ref, sampler=sampler, ent=ent, adv=adv, mask=mask)


class _Accel:
    """accelerate.Accelerator on one process: every collective is the identity."""
    num_processes = 1
    sync_gradients = True

    def gather(self, x):
        return x

    def reduce(self, x, reduction="sum"):
        return x

    def pad_across_processes(self, x, dim=0, pad_index=0):
        return x


def _trl(a, *, loss_type, level="token", beta=0.0, delta=None, eps_high=0.28, sampler_mode=None,
         top_q=1.0, entropy_coef=0.0, clip_max=3.0):
    """TRL's loss, metrics and gradients (d loss / d logp, d loss / d entropy) on the arrays `a`."""
    t = object.__new__(GRPOTrainer)
    t.loss_type, t.importance_sampling_level, t.beta = loss_type, level, beta
    t.epsilon_low, t.epsilon_high = 0.2, eps_high
    t.top_entropy_quantile, t.off_policy_mask_threshold, t.aux_loss_enabled = top_q, None, False
    t.use_vllm = sampler_mode is not None
    t.vllm_importance_sampling_correction = sampler_mode is not None
    t.max_completion_length = C
    t.current_gradient_accumulation_steps = 1
    t.entropy_coef, t.use_adaptive_entropy, t._entropy_bonus_enabled = entropy_coef, False, entropy_coef != 0.0
    t.args = types.SimpleNamespace(delta=delta, use_bias_correction_kl=True, sapo_temperature_pos=1.0,
                                   sapo_temperature_neg=1.05, vespo_k_pos=2.0, vespo_lambda_pos=3.0, vespo_k_neg=3.0,
                                   vespo_lambda_neg=2.0, steps_per_generation=1, entropy_target=0.2)
    t.accelerator = _Accel()
    t.model = types.SimpleNamespace(training=True)
    t._metrics = collections.defaultdict(lambda: collections.defaultdict(list))
    logp = torch.tensor(a["logp"], requires_grad=True)
    ent = torch.tensor(a["ent"], requires_grad=True)
    t._get_per_token_logps_and_entropies = lambda *args, **kw: (logp, ent, None)
    mask = torch.tensor(a["mask"]).long()
    inputs = {"prompt_ids": torch.zeros(B, 2, dtype=torch.long), "prompt_mask": torch.ones(B, 2, dtype=torch.long),
              "completion_ids": torch.zeros(B, C, dtype=torch.long), "completion_mask": mask,
              "advantages": torch.tensor(a["adv"]), "old_per_token_logps": torch.tensor(a["old"]),
              "ref_per_token_logps": torch.tensor(a["ref"]), "num_items_in_batch": mask.sum().float()}
    if sampler_mode is not None:
        w = _trl_is_ratio(a, sampler_mode, clip_max)
        inputs["importance_sampling_ratio"] = w
    loss = t._compute_loss(None, inputs)
    loss.backward()
    metrics = {k: v[-1] for k, v in t._metrics["train"].items()}
    ent_grad = np.zeros((B, C), np.float32) if ent.grad is None else ent.grad.numpy()  # unused without the bonus
    return float(loss.detach()), metrics, logp.grad.numpy(), ent_grad


def _trl_is_ratio(a, mode, clip_max, clip_min=None):
    """TRL's vLLM importance-sampling ratio: the block of `GRPOTrainer._generate_and_score_completions` that
    computes it, cut from TRL's source by its opening/closing comments and run on our arrays (fails loudly if
    TRL's source changes shape)."""
    import inspect
    import math
    import textwrap

    src = inspect.getsource(GRPOTrainer._generate_and_score_completions)
    start = src.index("            if self.use_vllm and self.vllm_importance_sampling_correction:\n"
                      "                mask =")
    end = src.index("            # Compute the per-token log probabilities for the reference model")
    block = textwrap.dedent(src[start:end])
    self = types.SimpleNamespace(use_vllm=True, vllm_importance_sampling_correction=True,
                                 vllm_importance_sampling_mode=mode, vllm_importance_sampling_clip_max=clip_max,
                                 vllm_importance_sampling_clip_min=clip_min)
    ns = dict(self=self, torch=torch, math=math, completion_mask=torch.tensor(a["mask"]), tool_mask=None,
              old_per_token_logps=torch.tensor(a["old"]), sampling_per_token_logps=torch.tensor(a["sampler"]))
    exec(block, ns)
    return ns["vllm_importance_sampling_ratio"]


def _ours(a, *, loss_type, level="token", beta=0.0, delta=None, eps_high=0.28, sampler_mode=None, top_q=1.0,
          entropy_coef=0.0, clip_max=3.0):
    def f(logp, ent):
        return grpo_loss(logp, jnp.asarray(a["adv"]), jnp.asarray(a["mask"]), old_logp_BC=jnp.asarray(a["old"]),
                         ref_logp_BC=jnp.asarray(a["ref"]), entropy_BC=ent, beta=beta, epsilon=0.2,
                         epsilon_high=eps_high, kl="k3", loss_type=loss_type, importance_sampling=level, delta=delta,
                         kl_is_weight=True,
                         sampler_logp_BC=None if sampler_mode is None else jnp.asarray(a["sampler"]),
                         sampler_is_mode=sampler_mode or "token_truncate", sampler_is_max=clip_max,
                         top_entropy_quantile=top_q, entropy_coef=entropy_coef)

    (loss, m), (g, ge) = jax.value_and_grad(f, argnums=(0, 1), has_aux=True)(jnp.asarray(a["logp"]),
                                                                          jnp.asarray(a["ent"]))
    return float(loss), m, np.asarray(g), np.asarray(ge)


def _eps_high(loss_type):
    return 1.3 if loss_type == "cispo" else 0.28  # cispo's eps_high is the raw cap on the ratio


CASES = ([dict(loss_type=lt) for lt in LOSS_TYPES]
         + [dict(loss_type=lt, level="sequence") for lt in ("grpo", "dapo", "luspo", "dr_grpo")]
         + [dict(loss_type=lt, beta=0.05) for lt in ("grpo", "dapo", "dr_grpo", "bnpo")]
         + [dict(loss_type="dapo", delta=1.25), dict(loss_type="grpo", delta=1.1, level="sequence")]
         + [dict(loss_type=lt, sampler_mode=sm) for lt in ("dapo", "grpo") for sm in SAMPLER_IS_MODES]
         + [dict(loss_type="vespo", sampler_mode="token_truncate"), dict(loss_type="cispo", sampler_mode="token_mask")]
         + [dict(loss_type="dapo", top_q=0.3), dict(loss_type="grpo", top_q=0.0),
            dict(loss_type="dapo", entropy_coef=0.1), dict(loss_type="grpo", top_q=0.5, entropy_coef=0.2, beta=0.05)])


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()))
def test_loss_and_gradient_equal_trl(case):
    a = _arrays()
    kw = dict(eps_high=_eps_high(case["loss_type"]), **case)
    if case.get("sampler_mode") in ("token_mask", "sequence_mask"):
        kw["clip_max"] = 1.5  # so some tokens/sequences are masked out
    t_loss, t_m, t_g, t_ge = _trl(a, **kw)
    o_loss, o_m, o_g, o_ge = _ours(a, **kw)
    np.testing.assert_allclose(o_loss, t_loss, **TOL)
    assert np.abs(t_g).max() > 1e-3  # not two zero gradients
    np.testing.assert_allclose(o_g, t_g, **TOL)
    np.testing.assert_allclose(o_ge, t_ge, **TOL)  # entropy gradient: nonzero only with the bonus
    assert (np.abs(t_ge).max() > 1e-3) == bool(case.get("entropy_coef"))
    for k in ("clip_ratio/low_mean", "clip_ratio/high_mean", "clip_ratio/region_mean", "clip_ratio/low_min",
              "clip_ratio/high_max", "cispo_clip_ratio", "vespo/phi_seq_mean"):
        if k in t_m:
            np.testing.assert_allclose(float(o_m[k]), t_m[k], err_msg=k, **TOL)
    if case.get("beta"):
        np.testing.assert_allclose(float(o_m["kl"]), t_m["kl"], **TOL)
    if "clip_ratio/region_mean" in t_m and case.get("level", "token") == "token" and not case.get("top_q"):
        assert t_m["clip_ratio/region_mean"] > 0.05  # the arrays exercise the clipped branch


@pytest.mark.parametrize("mode", SAMPLER_IS_MODES)
def test_sampler_is_weights_equal_trl(mode):
    a = _arrays(1)
    for clip_min, clip_max in ((None, 3.0), (0.7, 1.4)):
        ref = _trl_is_ratio(a, mode, clip_max, clip_min).numpy()
        w, m = sampler_is_weights(jnp.asarray(a["sampler"]), jnp.asarray(a["old"]), jnp.asarray(a["mask"]),
                                  mode=mode, clip_min=clip_min, clip_max=clip_max)
        np.testing.assert_allclose(np.asarray(w), np.broadcast_to(ref, (B, C)), **TOL)
        d = np.abs(a["old"] - a["sampler"])[a["mask"] > 0]
        np.testing.assert_allclose(float(m["sampling/sampling_logp_difference/mean"]), d.mean(), **TOL)
        np.testing.assert_allclose(float(m["sampling/sampling_logp_difference/max"]), d.max(), **TOL)
    assert 0.0 < float(m["sampling/is_clipped_frac"]) < 1.0  # the tight bounds clip some, not all


def test_default_loss_is_unchanged_by_new_arguments_at_their_defaults():
    a = _arrays(2)
    args = (jnp.asarray(a["logp"]), jnp.asarray(a["adv"]), jnp.asarray(a["mask"]))
    kw = dict(old_logp_BC=jnp.asarray(a["old"]), ref_logp_BC=jnp.asarray(a["ref"]))
    base, _ = grpo_loss(*args, **kw)
    same, _ = grpo_loss(*args, **kw, loss_type=None, importance_sampling="token", top_entropy_quantile=1.0,
                        entropy_coef=0.0, sampler_logp_BC=None)
    assert float(base) == float(same)
    grpo_trl, _ = grpo_loss(*args, **kw, loss_type="grpo")
    assert abs(float(grpo_trl) - float(base)) > 1e-4  # TRL's grpo counts the empty row, Tunix does not
