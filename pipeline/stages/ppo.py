"""Stage 4, ppo: PPO-ptx (InstructGPT) against the frozen reward model, written on accelerate.

Objective (Ouyang et al. 2022): maximize E_(x,y)~π [ r(x, y) − β log(π(y|x) / π_SFT(y|x)) ] + γ_ptx E_pretrain[log π(x)],
with the KL term applied per token (Ziegler et al. 2019) and the pretraining term as an LM loss on corpus
batches mixed into every optimizer step.

setup → train → save:
  1. validate the prompts and the corpus before any model is loaded;
  2. load the policy (SFT output), the frozen reference (the same SFT weights), the frozen reward model and
     the value model (initialised from the reward model, as InstructGPT does); dropout off everywhere;
  3. measure the SFT policy once on held-out prompts: reward-model score, gold score, corpus loss;
  4. for every iteration:
       a. rollout: sample one completion per prompt with the KV cache; without gradients compute the
          policy's and the reference's log-probs, the values and the reward-model score;
       b. rewards: −β·KL per token plus the score at the last real token (minus a penalty if it never
          ended); advantages by GAE, whitened over the batch; returns for the value loss;
       c. optimize: `ppo_epochs` passes over minibatches; clipped surrogate + c_v · clipped value loss
          + γ_ptx · LM loss on a corpus batch; gradient clipping; then update β (adaptive controller);
       d. log, evaluate every `eval_steps`, checkpoint every `save_steps` (a rerun resumes there);
  5. measure the final policy the same way; write the policy (AutoModelForCausalLM), the value model
     (value_model/), samples and summary.json atomically.

N processes (`accelerate launch`, DDP or DeepSpeed ZeRO): each samples its own slice of the global prompt
batch; advantages are whitened with the whole batch's statistics, token losses are divided by the whole
minibatch's token count, and every logged number is averaged over processes; only the main process writes.
Sampling seeds belong to fixed chunks of the global batch (`generation_batch_size` prompts each), so N
processes sample what one process would. Under ZeRO-3 the reference and reward model are sharded inference
engines, every rank makes the same number of forwards (a forward is a collective there), and the policy is
gathered once per `generate` (see pipeline/distributed.py). Rollouts and evaluation are in pipeline/rollout.py,
the optimization of a rollout in pipeline/update.py, the math in pipeline/rlhf.py.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase, get_scheduler
from transformers import set_seed as hf_set_seed
from trl.trainer.utils import disable_dropout_in_model

from pipeline import distributed, lora, rlhf, signals, tracking
from pipeline.checkpoint import StageOutput, build_summary, write_jsonl
from pipeline.config import Config, ConfigError, PPOConfig, stage_key, to_dict
from pipeline.data import as_chat, load_corpus, load_prompts, pack_corpus
from pipeline.evaluation import check_gold_covers, gold_function, render_prompt
from pipeline.guards import PPOGuard
from pipeline.modeling import (
    check_same_tokenizer,
    context_length,
    load_reward_model,
    load_reward_model_tokenizer,
    load_stage_model,
)
from pipeline.rollout import Models, PolicyAndValue, Rollout, evaluate_policy, sample_batch
from pipeline.update import build_optimizer, global_moments, ppo_update, rollout_metrics

log = logging.getLogger(__name__)
STAGE = "ppo"
SAMPLE_COLUMNS = ("prompt", "completion", "score", "gold", "kl", "ended", "num_tokens")
STATE_FILE = "ppo_state.json"


@tracking.tracked(STAGE)
def run(cfg: Config) -> dict[str, Any]:
    started = time.time()
    p = cfg.ppo
    hf_set_seed(cfg.seed)
    # Before any model is loaded: under ZeRO-3 `from_pretrained` then partitions the weights as it loads.
    accelerator = distributed.build_accelerator(bf16=p.bf16, micro_batch_size=p.minibatch_size,
                                                max_grad_norm=p.max_grad_norm, key="ppo")
    is_main = accelerator.is_main_process

    # 1. Data first: a malformed prompt or corpus row fails here, before any model is loaded.
    train_rows, eval_rows, ptx_corpus, ptx_eval_corpus = load_data(cfg)

    # 2. Models: policy and reference from SFT, value model from the RM, frozen RM. With LoRA one base model
    #    holds them all (pipeline/lora.py): adapters for policy, value and a LoRA RM; reference = adapters off.
    init = p.init or str(cfg.stage_dir("sft"))
    rm_path = p.reward_model or str(cfg.stage_dir("rm"))
    rm_target = None if p.reward_model else f"rm PROFILE={cfg.profile}"
    remote = cfg.model.trust_remote_code
    _check_lora(cfg)
    quantization = lora.quantization_config(cfg) if p.lora.enabled else None
    policy, tokenizer = load_stage_model(init, make_target=None if p.init else f"sft PROFILE={cfg.profile}",
                                         quantization=quantization, trust_remote_code=remote)
    rm_adapter = lora.rm_adapter(rm_path, init) if p.lora.enabled else None
    if rm_adapter is not None:  # the RM is an adapter on the policy's base: only its tokenizer is loaded here
        reward_model, rm_tokenizer = None, load_reward_model_tokenizer(rm_path, make_target=rm_target,
                                                                       trust_remote_code=remote)
    else:
        reward_model, rm_tokenizer = load_reward_model(rm_path, make_target=rm_target, quantization=quantization,
                                                       trust_remote_code=remote)
    if p.lora.enabled:
        ref_policy, value_model, value_tokenizer = None, None, rm_tokenizer
    else:
        ref_policy, _ = load_stage_model(p.reference or init, trust_remote_code=remote)
        value_model, value_tokenizer = load_reward_model(p.value_init or rm_path, trust_remote_code=remote)
    _check_models(p, policy, ref_policy, reward_model, tokenizer)
    check_same_tokenizer(tokenizer, init, rm_tokenizer, rm_path, "ppo.reward_model", "the reward model", rm_target)
    if p.value_init:
        check_same_tokenizer(tokenizer, init, value_tokenizer, p.value_init, "ppo.value_init", "the value model",
                              None)
    gold = gold_function(cfg.gold_reward)
    if p.reward == "gold" and gold is None:
        raise ConfigError("ppo.reward=gold (an oracle run) needs a gold reward: set gold_reward (tiny task only)")
    check_gold_covers(gold, eval_rows, tokenizer, "ppo.data.eval")
    check_gold_covers(gold, train_rows, tokenizer, "ppo.data.train")  # rollouts are scored by it too
    train_prompts = [render_prompt(r, tokenizer) for r in train_rows]
    eval_prompts = [render_prompt(r, tokenizer) for r in eval_rows for _ in range(p.eval_samples_per_prompt)]
    if p.disable_dropout:
        for m in (policy, ref_policy, reward_model, value_model):
            if m is not None:
                disable_dropout_in_model(m)

    ptx_blocks = corpus_blocks(ptx_corpus, tokenizer, p.ptx_block_size) if ptx_corpus is not None else None
    eval_blocks = (corpus_blocks(ptx_eval_corpus, tokenizer, p.ptx_block_size)[: p.eval_corpus_blocks]
                   if ptx_eval_corpus is not None else None)

    if p.lora.enabled:
        rm_head = None
        if reward_model is not None:  # a separate RM: its head starts the value head (gathered under ZeRO-3)
            with torch.no_grad(), distributed.gathered_params([reward_model.score.weight]):
                rm_head = reward_model.score.weight.detach().clone()
        model = lora.build_shared_base(policy, p.lora, p.gradient_checkpointing, rm_adapter, rm_head,
                                       lora.reward_shift(rm_path) if rm_adapter else 0.0)
        if p.disable_dropout:  # the adapters' own dropout, added just now
            disable_dropout_in_model(model)
    else:
        if p.gradient_checkpointing:
            policy.gradient_checkpointing_enable()
            value_model.gradient_checkpointing_enable()
        model = PolicyAndValue(policy, value_model)
    trained = [t for t in model.parameters() if t.requires_grad]  # with LoRA: the two adapters and the value head
    optimizer = build_optimizer(trained, p, accelerator)
    steps_per_iteration = p.ppo_epochs * (p.rollout_batch_size // p.minibatch_size)
    total_steps = p.iterations * steps_per_iteration
    scheduler = get_scheduler(p.lr_scheduler if not p.warmup_ratio or p.lr_scheduler == "linear"
                              else "constant_with_warmup", optimizer,
                              num_warmup_steps=int(p.warmup_ratio * total_steps), num_training_steps=total_steps)
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    # Frozen models: sharded inference engines under ZeRO-3, replicated otherwise (collective: every rank). With
    # LoRA the reference (and a LoRA RM) are roles of the trained module itself: no second copy of the base.
    shared = accelerator.unwrap_model(model) if p.lora.enabled else None
    ref = shared.reference if shared is not None else distributed.prepare_frozen(ref_policy, accelerator)
    rm = (shared.reward_model if shared is not None and reward_model is None
          else distributed.prepare_frozen(reward_model, accelerator))
    models = Models(accelerator, model, ref, rm, tokenizer, p.gather_for_generation)
    frozen = {} if shared is not None else {"reference": models.ref_policy}
    if reward_model is not None:
        frozen["reward_model"] = models.reward_model
    layout = distributed.describe(accelerator, trained=model, **frozen)
    if shared is not None:
        layout["lora"] = {"shared_base": True, "reward_model": "adapter" if reward_model is None else "separate",
                          "quantized": "4bit" if cfg.model.load_in_4bit else "8bit" if cfg.model.load_in_8bit
                          else None}
    log.info("ppo: %s", layout)

    out = StageOutput(cfg.stage_dir(STAGE), stage_key(cfg, STAGE))
    resume_from = out.prepare(is_main=is_main)
    tracking.start(cfg, STAGE, is_main=is_main)
    state: dict[str, Any] = {"iteration": 0, "beta": p.kl_coef, "history": []}

    def evaluate(step: int) -> tuple[dict[str, float], list[dict[str, Any]]]:
        metrics, samples = evaluate_policy(models, eval_prompts, eval_blocks, p, gold, seed=cfg.seed + 1)
        tracking.log_metrics(metrics, step=step)
        log.info("ppo: held-out at iteration %d: %s", step, _fmt(metrics))
        return metrics, samples

    # 3. The SFT policy, measured once (a resumed run reads the numbers saved before the interruption).
    # Measured before a checkpoint is loaded, so it is always the SFT policy's.
    baseline = out.load_baseline()
    if baseline is None:
        baseline, _ = evaluate(0) if eval_prompts else ({}, [])
        out.save_baseline(baseline)
    elif not resume_from:  # killed after measuring it, before the first checkpoint: the history still starts here
        tracking.log_metrics(baseline, step=0)
    if baseline and not resume_from:
        state["history"].append({tracking.STEP: 0, **baseline})
    # Reseeded after the baseline (measured or reused), then the checkpoint's RNG restored if resuming: the
    # training draws never depend on whether, or where, an earlier run was killed.
    hf_set_seed(cfg.seed)
    if resume_from:
        accelerator.load_state(resume_from)
        state = json.loads((Path(resume_from) / STATE_FILE).read_text())
        log.info("ppo: resumed at iteration %d of %d", state["iteration"], p.iterations)
    guard = PPOGuard(p.nan_policy, out.checkpoints_dir, accelerator, state.get("skipped_nonfinite", 0))

    # 4. Train.
    beta = state["beta"]
    progress = tqdm(range(state["iteration"], p.iterations), desc="PPO", disable=not is_main,
                    initial=state["iteration"], total=p.iterations)
    for iteration in progress:
        step = iteration + 1
        # a. rollout on this process's slice of the iteration's global prompt batch
        batch = _iteration_prompts(train_prompts, p.rollout_batch_size, iteration, cfg.seed, accelerator)
        rollout = sample_batch(models, batch, p, gold, cfg.seed, iteration)
        # b. rewards and advantages
        scores = rollout.scores.clone()
        if p.missing_eos_penalty is not None:
            scores = scores - p.missing_eos_penalty * (~rollout.ended).float()
        rewards, kl = rlhf.per_token_rewards(scores, rollout.logprobs, rollout.ref_logprobs, rollout.mask, beta)
        if p.whiten_rewards:
            rewards = rlhf.masked_whiten(rewards, rollout.mask, shift_mean=False,
                                         **global_moments(accelerator, rewards, rollout.mask))
        advantages, returns = rlhf.gae_advantages(rewards, rollout.values, rollout.mask, p.gamma, p.lam)
        advantages = rlhf.masked_whiten(advantages, rollout.mask,
                                        **global_moments(accelerator, advantages, rollout.mask))
        # A NaN reward, KL or advantage would reach every weight in the update: stop (or skip this rollout).
        if not guard.check({"reward": scores, "KL": kl, "advantage": advantages}, step, "rollout"):
            state.update(iteration=step, skipped_nonfinite=guard.skipped)
            continue
        # c. PPO epochs over minibatches, each optimizer step with a ptx batch
        train_stats = ppo_update(accelerator, model, optimizer, scheduler, rollout, advantages, returns,
                                 ptx_blocks, p, cfg.seed, iteration, guard=guard)
        if p.nan_policy == "skip":
            state["skipped_nonfinite"] = guard.skipped
        metrics = rollout_metrics(accelerator, rollout, kl, rewards, returns, beta)
        metrics.update(train_stats)
        metrics["ppo/lr"] = scheduler.get_last_lr()[0]
        if p.target_kl is not None:
            beta = rlhf.adaptive_kl_beta(beta, metrics["ppo/kl"], p.target_kl, p.kl_horizon,
                                         p.rollout_batch_size * accelerator.num_processes)
        # d. log, evaluate, checkpoint
        if step % p.logging_steps == 0 or step == p.iterations:
            tracking.log_metrics(metrics, step=step)
            state["history"].append({tracking.STEP: step, **metrics})
            progress.set_postfix(score=f"{metrics['ppo/score']:.3f}", kl=f"{metrics['ppo/kl']:.3f}",
                                 **({"gold": f"{metrics['ppo/gold_score']:.3f}"} if gold else {}))
        if step % p.table_steps == 0 or step == p.iterations:
            _log_samples_table("ppo/samples", rollout, kl, n=8)
        if p.eval_steps and step % p.eval_steps == 0 and step < p.iterations and eval_prompts:
            state["history"].append({tracking.STEP: step, **evaluate(step)[0]})
        state.update(iteration=step, beta=beta)
        # SIGTERM / Ctrl-C on any process: all of them checkpoint this iteration and stop (pipeline/signals.py).
        stop = signals.agreed_stop(accelerator.device)
        if stop or (step % p.save_steps == 0 and step < p.iterations):
            out.save_checkpoint(accelerator, {STATE_FILE: state}, step, p.save_total_limit)
        if stop:
            raise signals.Stopped(stop, STAGE, step, str(out.checkpoints_dir / f"checkpoint-{step}"))

    # 5. The final policy, measured the same way, and the atomic save.
    final, samples = evaluate(p.iterations) if eval_prompts else ({}, [])
    if final:
        state["history"].append({tracking.STEP: p.iterations, **final})
    metrics = _summary_metrics(final, baseline, state, p)
    summary = build_summary(STAGE, to_dict(cfg), metrics, started, init=init, reward_model=rm_path,
                            resumed_from=resume_from, distributed=layout,
                            conversational=bool(train_rows[0].get("messages")))  # how to prompt it (chat)
    staging = out.begin_final()
    accelerator.wait_for_everyone()
    unwrapped = accelerator.unwrap_model(model)
    state_dict = accelerator.get_state_dict(model)  # collective under FSDP / ZeRO-3
    if is_main and p.lora.enabled:
        lora.save_ppo(unwrapped, state_dict, staging, init, cfg.model.dtype, tokenizer, value_tokenizer)
    elif is_main:
        unwrapped.policy.save_pretrained(
            staging, state_dict=distributed.submodule_state_dict(state_dict, "policy", unwrapped.policy)
        )
        tokenizer.save_pretrained(staging)
        value_dir = staging / "value_model"
        unwrapped.value_model.save_pretrained(
            value_dir,
            state_dict=distributed.submodule_state_dict(state_dict, "value_model", unwrapped.value_model),
        )
        value_tokenizer.save_pretrained(value_dir)
    if is_main:
        write_jsonl(staging / "log_history.jsonl", state["history"])
        write_jsonl(staging / "samples.jsonl", samples)
        out.commit(summary)
    accelerator.wait_for_everyone()
    tracking.log_table("eval/samples", SAMPLE_COLUMNS, [[r.get(c) for c in SAMPLE_COLUMNS] for r in samples[:64]])
    log.info("ppo: wrote %s (%s)", out.final_dir, _fmt(metrics))
    return metrics


def _iteration_prompts(
    prompts: list[tuple[str, str]], batch_size: int, iteration: int, seed: int, accelerator: Accelerator
) -> list[tuple[str, str]]:
    """This process's prompts of iteration `iteration`: epochs of shuffled prompts, cut into global batches."""
    global_size = batch_size * accelerator.num_processes
    start = iteration * global_size + accelerator.process_index * batch_size
    orders: dict[int, torch.Tensor] = {}  # one shuffle per epoch (a batch spans at most a few)
    out = []
    for pos in range(start, start + batch_size):
        epoch, offset = divmod(pos, len(prompts))
        if epoch not in orders:
            orders[epoch] = torch.randperm(len(prompts), generator=torch.Generator().manual_seed(seed * 7 + epoch))
        out.append(prompts[int(orders[epoch][offset])])
    return out


def corpus_blocks(corpus: Any, tokenizer: PreTrainedTokenizerBase, block_size: int) -> torch.Tensor:
    """[N, block_size] packed corpus blocks, for the ptx term and the held-out corpus loss."""
    return torch.tensor(pack_corpus(corpus, tokenizer, block_size, key="ppo.ptx_block_size")["input_ids"])


def load_data(cfg: Config) -> tuple[list[dict], list[dict], Any, Any]:
    """The validated prompts (train; held-out, the first `ppo.eval_prompts`) and the corpora of the ptx term
    and of the held-out corpus loss (None when `ppo.ptx_coef` = 0, resp. no held-out corpus or
    `ppo.eval_corpus_blocks` = 0)."""
    p = cfg.ppo
    train_rows = list(_prompts(cfg, p.data.train))
    eval_rows = list(_prompts(cfg, p.data.eval))[: p.eval_prompts] if p.data.eval else []
    ptx_corpus = load_corpus(ptx_source(cfg), registry=cfg.datasets) if p.ptx_coef > 0 else None
    eval_source = ptx_eval_source(cfg)
    ptx_eval_corpus = load_corpus(eval_source, registry=cfg.datasets) if eval_source and p.eval_corpus_blocks else None
    return train_rows, eval_rows, ptx_corpus, ptx_eval_corpus


def _prompts(cfg: Config, source: str) -> Any:
    """The prompt rows of `source`; with `chat_prompts` plain prompts become a user turn (a chat model is prompted
    through its chat template)."""
    rows = load_prompts(source, cfg.ppo.data.skip_invalid, cfg.datasets)
    return as_chat(rows) if cfg.chat_prompts else rows


def ptx_source(cfg: Config) -> str:
    return cfg.ppo.ptx_data or cfg.pretrain.data.train


def ptx_eval_source(cfg: Config) -> str | None:
    return cfg.ppo.ptx_eval_data or cfg.pretrain.data.eval


# ------------------------------------------------------------------------------------------------- metrics


def _summary_metrics(final: dict[str, float], baseline: dict[str, float], state: dict[str, Any],
                     p: PPOConfig) -> dict[str, Any]:
    """Final held-out metrics, the SFT policy's as `<key>_init`, and the gains that matter."""
    metrics: dict[str, Any] = {"ppo/iterations": p.iterations, "ppo/beta": state["beta"]}
    if p.nan_policy == "skip":  # rollouts and minibatches the non-finite guard left out
        metrics["ppo/skipped_nonfinite"] = state.get("skipped_nonfinite", 0)
    last = next((r for r in reversed(state["history"]) if "ppo/score" in r), {})
    metrics.update({k: last[k] for k in ("ppo/score", "ppo/kl", "ppo/gold_score") if k in last})
    metrics.update(final)
    metrics.update({f"{k}_init": v for k, v in baseline.items()})
    if "eval/kl" in final:
        metrics["eval/kl_to_sft"] = final["eval/kl"]
    for key in ("eval/gold_score", "eval/score"):
        if key in final and key in baseline:
            metrics[f"{key}_gain"] = final[key] - baseline[key]
    return metrics


def _log_samples_table(name: str, r: Rollout, kl: torch.Tensor, n: int) -> None:
    if not tracking.is_active():
        return
    kl_seq = kl.sum(1)
    rows = [[r.prompts[i], r.completions[i], float(r.scores[i]), r.gold[i] if r.gold else None, float(kl_seq[i]),
             bool(r.ended[i]), int(r.mask[i].sum())] for i in range(min(n, len(r.prompts)))]
    tracking.log_table(name, SAMPLE_COLUMNS, rows)


# ------------------------------------------------------------------------------------------------- setup / save


def _check_lora(cfg: Config) -> None:
    """What the one-base LoRA layout cannot do, said before any model is loaded."""
    p = cfg.ppo
    lora.check_quantization(cfg, p.lora, STAGE)
    if not p.lora.enabled:
        return
    if p.reference and p.reference != (p.init or str(cfg.stage_dir("sft"))):
        raise ConfigError("ppo.reference with ppo.lora: the KL reference is the policy's own base with the adapter "
                          "switched off (ppo.init); set ppo.init to the reference model, or ppo.lora.r=0")
    if p.value_init:
        raise ConfigError("ppo.value_init with ppo.lora: the value adapter starts from the reward model's adapter "
                          "(a LoRA reward model) or fresh; unset ppo.value_init, or ppo.lora.r=0")


def _check_models(p: PPOConfig, policy: PreTrainedModel, ref_policy: PreTrainedModel | None,
                  reward_model: PreTrainedModel | None, tokenizer: PreTrainedTokenizerBase) -> None:
    """Fail before training when the models cannot work together (with LoRA the reference, and a LoRA reward
    model, are the policy's own base: nothing to compare)."""
    max_pos = context_length(policy)
    if max_pos and p.max_prompt_length + p.max_new_tokens > max_pos:
        raise ConfigError(f"'ppo.max_prompt_length' + 'ppo.max_new_tokens' ({p.max_prompt_length} + "
                          f"{p.max_new_tokens}) exceed the policy's context ({max_pos})")
    vocab = policy.get_input_embeddings().num_embeddings
    rm_vocab = reward_model.get_input_embeddings().num_embeddings if reward_model is not None else vocab
    if rm_vocab < vocab:
        raise ConfigError(f"the reward model's vocabulary ({rm_vocab}) is smaller than the policy's ({vocab}): "
                          "'ppo.reward_model' must be trained from the same base model and tokenizer")
    if ref_policy is not None and ref_policy.get_input_embeddings().num_embeddings != vocab:
        raise ConfigError(f"the KL reference {p.reference!r} has another vocabulary than the policy {p.init!r}: "
                          "'ppo.reference' must be the policy's base (e.g. the sft output)")
    if tokenizer.eos_token_id is None:
        raise ConfigError("the policy's tokenizer has no EOS token: completions could never end")


def _fmt(metrics: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in metrics.items())
