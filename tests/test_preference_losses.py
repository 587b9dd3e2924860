"""Issue 13, beyond: the reference-free preference objectives ORPO and SimPO (`--loss_type orpo|simpo`), against
the published formulas on fixed numbers and against TRL's own implementations (trl.experimental: ORPOTrainer's
odds-ratio loss, CPOTrainer's SimPO loss), losses and gradients; and a run with each trains without a reference."""

from __future__ import annotations

import json
import math
import types

import pytest
import torch
import torch.nn.functional as F

from vlm.train.dpo import DPOSettings, dpo_loss, reference_free_losses

TOLERANCE = dict(rtol=1e-6, atol=1e-6)  # float32, the same operations up to order


def test_orpo_and_simpo_on_the_papers_formulas_with_fixed_numbers():
    # ORPO (Hong et al. 2024, eq. 4-7): odds(y) = P / (1 - P) with P the mean-per-token likelihood, L_OR =
    # -log σ(log(odds_c / odds_r)). P_c = 1/2 (odds 1) and P_r = 1/4 (odds 1/3): log odds ratio log 3.
    two_tokens = torch.tensor([2])
    chosen, rejected = 2 * torch.tensor([math.log(0.5)]), 2 * torch.tensor([math.log(0.25)])  # summed over 2 tokens
    losses, chosen_reward, rejected_reward = reference_free_losses(
        chosen, rejected, beta=0.1, loss_type="orpo", chosen_num_tokens=two_tokens, rejected_num_tokens=two_tokens)
    assert losses.item() == pytest.approx(-0.1 * math.log(1 / (1 + 1 / 3)), rel=1e-6)  # -λ log σ(log 3)
    assert (chosen_reward.item(), rejected_reward.item()) == pytest.approx((0.1 * math.log(0.5), 0.1 * math.log(0.25)))
    # SimPO (Meng et al. 2024, eq. 6): -log σ(β/|y_w| log π(y_w) - β/|y_l| log π(y_l) - γ)
    chosen, rejected = torch.tensor([-3.0]), torch.tensor([-8.0])  # 3 and 4 tokens: means -1 and -2
    losses, _, _ = reference_free_losses(chosen, rejected, beta=2.0, loss_type="simpo", simpo_gamma=0.5,
                                         chosen_num_tokens=torch.tensor([3]), rejected_num_tokens=torch.tensor([4]))
    assert losses.item() == pytest.approx(-math.log(1 / (1 + math.exp(-(2.0 * (-1 + 2) - 0.5)))), rel=1e-6)


def _pairs(seed: int = 0, b: int = 6, t: int = 7, v: int = 11):
    """Random logits and labels of B chosen and B rejected answers (-100 outside the answers), and our inputs:
    summed log-probabilities and token counts from them."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(2 * b, t, v, generator=g)
    labels = torch.randint(0, v, (2 * b, t), generator=g)
    lengths = torch.randint(2, t + 1, (2 * b,), generator=g)
    labels[torch.arange(t)[None, :] >= lengths[:, None]] = -100  # answers of 1..t-1 tokens after the shift
    labels[:, 0] = -100  # TRL's get_batch_logps shifts: position 0 is never a target
    return logits, labels


def _ours_from_logits(logits, labels):
    targets = labels[:, 1:]
    logps = torch.log_softmax(logits[:, :-1].float(), -1)
    mask = targets != -100
    token_logps = torch.gather(logps, 2, targets.clamp(min=0)[..., None])[..., 0] * mask
    return token_logps.sum(-1), mask.sum(-1)


def test_orpo_loss_and_gradient_equal_trls_odds_ratio_loss_plus_its_nll():
    from trl.experimental.orpo import ORPOTrainer

    for seed in range(3):
        logits, labels = _pairs(seed)
        b = logits.shape[0] // 2
        for beta in (0.1, 0.5):
            # TRL: ORPOTrainer's own get_batch_logps (mean per token) and odds_ratio_loss, NLL over the chosen tokens
            ref_logits = logits.clone().requires_grad_(True)
            averaged = ORPOTrainer.get_batch_logps(ref_logits, labels, average_log_prob=True)
            trainer = types.SimpleNamespace(beta=beta, accelerator=types.SimpleNamespace(device="cpu"))
            trl_losses, trl_chosen_rewards, _, _, _ = ORPOTrainer.odds_ratio_loss(trainer, averaged[:b], averaged[b:])
            nll = F.cross_entropy(ref_logits[:b, :-1].reshape(-1, logits.shape[-1]), labels[:b, 1:].reshape(-1),
                                  ignore_index=-100)
            trl_loss = nll - trl_losses.mean()  # ORPOTrainer.get_batch_loss_metrics: policy_nll_loss - losses.mean()
            trl_loss.backward()
            # ours: summed log-probs and counts of the same logits, through dpo_loss
            our_logits = logits.clone().requires_grad_(True)
            logps, counts = _ours_from_logits(our_logits, labels)
            settings = DPOSettings(beta=beta, loss_type="orpo")
            loss, chosen_rewards, _ = dpo_loss(logps[:b], logps[b:], None, None, settings,
                                               chosen_num_tokens=counts[:b], rejected_num_tokens=counts[b:])
            loss.backward()
            torch.testing.assert_close(loss, trl_loss, **TOLERANCE)
            torch.testing.assert_close(our_logits.grad, ref_logits.grad, **TOLERANCE)
            torch.testing.assert_close(chosen_rewards, trl_chosen_rewards, **TOLERANCE)


@pytest.mark.parametrize("label_smoothing", [0.0, 0.2])
def test_simpo_loss_and_gradient_equal_trls_cpo_simpo_loss(label_smoothing):
    from trl.experimental.cpo import CPOTrainer

    for seed in range(3):
        logits, labels = _pairs(seed + 10)
        b = logits.shape[0] // 2
        ref_logits = logits.clone().requires_grad_(True)
        averaged = CPOTrainer.get_batch_logps(ref_logits, labels, average_log_prob=True)  # TRL: simpo averages
        trainer = types.SimpleNamespace(beta=2.0, simpo_gamma=0.7, label_smoothing=label_smoothing, loss_type="simpo",
                                        alpha=0.0, accelerator=types.SimpleNamespace(device="cpu"))
        trl_losses, trl_chosen_rewards, trl_rejected_rewards = CPOTrainer.cpo_loss(trainer, averaged[:b], averaged[b:])
        trl_losses.mean().backward()
        our_logits = logits.clone().requires_grad_(True)
        logps, counts = _ours_from_logits(our_logits, labels)
        settings = DPOSettings(beta=2.0, loss_type="simpo", simpo_gamma=0.7, label_smoothing=label_smoothing)
        loss, chosen_rewards, rejected_rewards = dpo_loss(logps[:b], logps[b:], None, None, settings,
                                                          chosen_num_tokens=counts[:b], rejected_num_tokens=counts[b:])
        loss.backward()
        torch.testing.assert_close(loss, trl_losses.mean(), **TOLERANCE)
        torch.testing.assert_close(our_logits.grad, ref_logits.grad, **TOLERANCE)
        torch.testing.assert_close((chosen_rewards, rejected_rewards), (trl_chosen_rewards, trl_rejected_rewards),
                                   **TOLERANCE)


def test_flags_of_the_reference_free_losses_are_checked():
    from vlm.errors import ConfigError
    from vlm.train.arguments import parse_args

    base = ["--output_dir", "/tmp/x", "--method", "dpo"]
    assert parse_args([*base, "--loss_type", "simpo", "--simpo_gamma", "1.0"])[2].simpo_gamma == 1.0
    with pytest.raises(ConfigError, match="--simpo_gamma applies to --loss_type simpo"):
        parse_args([*base, "--loss_type", "orpo", "--simpo_gamma", "1.0"])
    with pytest.raises(ConfigError, match="uses no reference model"):
        parse_args([*base, "--loss_type", "orpo", "--precompute_ref_log_probs", "True"])


@pytest.mark.parametrize("loss_type", ["orpo", "simpo"])
def test_a_reference_free_run_builds_no_reference_and_trains(tmp_path, monkeypatch, loss_type):
    import vlm.train.dpo
    from vlm.demo_preference import PreferenceDemoConfig, run_preference_demo

    copies = []
    real_copy = vlm.train.dpo.frozen_copy
    monkeypatch.setattr(vlm.train.dpo, "frozen_copy", lambda model: copies.append(model) or real_copy(model))
    run_preference_demo(PreferenceDemoConfig(run_dir=str(tmp_path), n_train=40, n_eval=4, sft_steps=4, dpo_steps=6,
                                             batch_size=4, loss_type=loss_type, rpo_alpha=0.0))
    assert copies == []  # no reference model
    rows = [json.loads(line) for line in (tmp_path / "dpo" / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if "loss" in r]
    assert len(rows) == 6 and all(r["rewards/chosen"] < 0 for r in rows)  # β × mean log-prob per token
    if loss_type == "orpo":  # the NLL term is part of ORPO's loss: at least the chosen answers' mean NLL
        assert all(r["loss"] > -r["rewards/chosen"] / 0.1 * 0.5 for r in rows)
