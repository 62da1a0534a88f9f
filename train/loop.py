"""The training loop: data, sharded state, jitted steps, eval, checkpoints, logs."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import sys
import time

import jax
import numpy as np
import yaml
from tqdm.auto import tqdm

from ..errors import CheckpointError, ConfigError, JaxlmError
from ..model import model_specs
from ..model.companions import copy_companions
from ..config import Config, config_from_dict, flatten, to_dict
from ..model.config import model_flops_per_token
from ..model.tokenizer import load_tokenizer, train_sentencepiece
from ..sharding.distributed import local_batch_size, local_rows, put_batch
from ..sharding.mesh import check_divisible, make_mesh, model_dims
from ..sharding.pipeline import check_pipeline_mesh, pipeline_of, pipeline_summary
from ..sharding.rules import named_sharding, use_mesh
from . import base as pinned, checkpoint, guard, span
from .data import eval_batches, make_batches, open_sources, sample_texts
from .metrics import MetricsLog, device_peak, mesh_devices, mfu
from .objectives import batch_objective, check_objective, is_token_cross_entropy
from .onpolicy import on_policy_hook
from .optimizer import learning_rate_schedule, make_optimizer
from .lora import trainable_specs
from .state import (abstract_state, attach_frozen, create_state, needs_frozen,
                    state_shardings, with_teacher)
from .step import compile_steps

CONFIG_FILE = "config.yaml"
TOKENIZER_FILE = "tokenizer.model"


def train(cfg: Config, *, resume: bool = False, stop_after: int | None = None,
          progress: bool = True, step: int | None = None,
          accept_base_change: bool = False) -> dict:
    """Train `cfg` in `cfg.run_dir`; with `resume`, continue its latest checkpoint
    (or checkpoint `step`: the later ones are moved aside, not deleted).

    `stop_after`: stop (with a checkpoint) once this step is reached, as an
    interrupted run would. Returns a summary with the eval losses. The run dir
    is locked for the life of the run (a second writer: ConfigError), and
    SIGTERM (a preemption) stops it as Ctrl-C does, after the current step, with a
    checkpoint of it (the `jaxlm train` command then exits 0, Ctrl-C 130);
    multi-host, all processes agree on the stop step. Non-finite steps are
    skipped on device; train.max_skipped_steps of them in a row stop the run.

    A LoRA or DPO run pins its base (train.init_from) in base.json: a resume whose
    base weights changed is refused unless `accept_base_change` (`jaxlm.train.base`).
    """
    if cfg.model.weight_dtype:  # before the run dir is touched
        w = cfg.model.weight_dtype
        raise ConfigError(f"model.weight_dtype={w} is for inference (jaxlm quantize): train "
                          f"float weights (set model.weight_dtype=''), or fine-tune a {w} "
                          f"base with train.lora.rank=R train.lora.base_dtype={w}")
    check_objective(cfg.train, cfg.model)  # before the run dir is touched too
    from .distill import check_teacher
    from .ppo import check_ppo
    check_teacher(cfg)  # a teacher of another vocabulary: refused before any write
    check_ppo(cfg)  # no reward model, or one of another vocabulary: likewise
    made = _missing_ancestor(cfg.run_dir)  # what this call creates (None: the dir exists)
    try:
        with guard.run_dir_lock(cfg.run_dir), guard.stop_signals() as stop:
            return _train(cfg, resume=resume, stop_after=stop_after, progress=progress,
                          step=step, stop=stop, accept_base_change=accept_base_change)
    except JaxlmError:
        # refused before the run began (a mesh the devices cannot make, a missing corpus,
        # ...): the dirs this call made go again, holding only its config, lock and
        # tokenizer; a run that logged or saved anything keeps it
        if (made and jax.process_index() == 0 and not os.path.exists(
                os.path.join(cfg.run_dir, "metrics.jsonl"))
                and checkpoint.latest_step(cfg.run_dir) is None):
            shutil.rmtree(made, ignore_errors=True)
        raise


def _missing_ancestor(path: str) -> str | None:
    """The outermost directory of `path` that does not exist yet (None: `path` exists)."""
    path, made = os.path.abspath(path), None
    while not os.path.exists(path):
        made, path = path, os.path.dirname(path)
    return made


def _train(cfg: Config, *, resume: bool, stop_after: int | None, progress: bool,
           step: int | None, stop: guard.StopRequest, accept_base_change: bool) -> dict:
    run_dir = cfg.run_dir
    _check_run_dir(cfg, resume)
    base_step, base_record = _pin_base(cfg, resume, accept_base_change)  # before any write
    frozen = _pin_frozen(cfg, resume, accept_base_change)  # a teacher, a reward model
    teacher_step = frozen.get(pinned.TEACHER, (None,))[0]
    os.makedirs(run_dir, exist_ok=True)
    lead = jax.process_index() == 0  # multi-host: one writer of the run dir's files
    progress = progress and lead
    if lead:
        _write_config(cfg)
        if base_record is not None:
            pinned.write(run_dir, base_record)
        for name, (_, rec) in frozen.items():
            if rec is not None:
                pinned.write(run_dir, rec, name)

    batches, eval_host, tokenizer = _data(cfg)
    tasks = _eval_tasks(cfg, tokenizer)  # a typo in train.eval_tasks stops here, not at eval

    mesh = make_mesh(cfg.mesh)
    rules = cfg.mesh.rules
    check_divisible(mesh, rules, model_dims(cfg))
    check_pipeline_mesh(cfg, dict(mesh.shape))
    if lead and cfg.mesh.stage > 1:  # the schedule's idle share, stated once
        print(pipeline_summary(cfg), flush=True)
    tx = make_optimizer(cfg.train, trainable_specs(cfg))  # LoRA: the adapters only
    lr = learning_rate_schedule(cfg.train)
    mngr = checkpoint.manager(run_dir, keep=cfg.train.keep_checkpoints)
    with use_mesh(mesh, rules):
        if resume:
            state, data_state = checkpoint.restore_state(mngr, abstract_state(cfg, mesh, tx), step)
            if needs_frozen(cfg):  # checkpoints hold no frozen tree: rebuilt from init_from
                state = attach_frozen(cfg, mesh, state, _initial_params(cfg, mesh, base_step))
            batches.set_state(_own_data_state(data_state))
            _resumed(cfg, mngr, int(state.step))
        else:
            params = _initial_params(cfg, mesh, base_step)
            if cfg.train.objective == "ppo":  # with the value model's
                from .ppo import initial_params
                params = initial_params(cfg, mesh, params)
            state = create_state(cfg, mesh, tx, cfg.train.seed, params)
            if cfg.train.lora.init_from:  # continue a peft adapter
                state = _peft_adapters(cfg, mesh, tx, state)
        # distill: the teacher (of its pinned step), frozen, in its shardings
        state = with_teacher(cfg, mesh, state, teacher_step)
        batch_sharding = named_sharding(mesh, ("batch", "seq"), rules)
        train_step, eval_step = compile_steps(cfg.model, tx, lr, state_shardings(cfg, mesh, tx),
                                              batch_sharding, cfg.train.loss_vocab_chunk,
                                              batch_objective(cfg.train, cfg.model, tokenizer),
                                              tcfg=cfg.train, pipeline=pipeline_of(cfg),
                                              teacher=_teacher_config(cfg),
                                              critic=_critic_config(cfg))
        # every process builds the same eval batches and keeps its block of rows
        evals = [put_batch(local_rows(b, cfg.data.batch_size), batch_sharding) for b in eval_host]
        loop = _Loop(cfg, mngr, batches, train_step, eval_step, evals, batch_sharding, progress,
                     stop, on_policy_hook(cfg, tokenizer))
        loop.tasks = tasks
        if cfg.train.objective in ("grpo", "ppo"):  # rollouts by the engine over the params
            # ppo: the reward model (of its pinned step), read into its shardings
            batches.place(mesh, frozen.get(pinned.REWARD_MODEL, (None,))[0])
            loop.rollouts = batches
        with checkpoint.quiet_full_disk():  # reported once, below, not by orbax's threads
            try:
                return loop.run(state, stop_after)
            except Exception as e:
                if checkpoint.no_space(e):
                    raise _disk_full(cfg, mngr, state) from None
                raise
            finally:
                try:
                    mngr.wait_until_finished()  # an async save's error is raised here
                except Exception as e:
                    if not checkpoint.no_space(e):
                        raise
                    raise _disk_full(cfg, mngr, state) from None
                finally:
                    mngr.close()
                    loop.log.close()


def _checkpoint_bytes(state, run_dir: str | None = None) -> int:
    """What a checkpoint of `state` writes, about: its params and optimizer state, or the
    latest checkpoint's size on disk when that is larger (orbax's metadata and the data
    state), with 20% to spare."""
    held = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves((state.params, state.opt_state)))
    latest = checkpoint.latest_step(run_dir) if run_dir else None
    on_disk = 0
    if latest is not None:
        for d, _, files in os.walk(os.path.join(run_dir, checkpoint.CHECKPOINTS, str(latest))):
            on_disk += sum(os.path.getsize(os.path.join(d, f)) for f in files
                           if os.path.isfile(os.path.join(d, f)))
    return int(max(held, on_disk) * 1.2)


def _disk_full(cfg: Config, mngr, state) -> CheckpointError:
    """One line for a save that does not fit the disk: where, what a checkpoint needs,
    what is free, and the checkpoint that is intact."""
    from ..sharding.plan import fmt_bytes
    need, free = _checkpoint_bytes(state, cfg.run_dir), shutil.disk_usage(cfg.run_dir).free
    latest = mngr.latest_step()
    return CheckpointError(
        f"no space left on the device of {os.path.abspath(cfg.run_dir)}: a checkpoint needs "
        f"about {fmt_bytes(need)}, {fmt_bytes(free)} is free; "
        + (f"the latest checkpoint, step {latest}, is intact: free space (or move the run "
           "dir to a larger disk), then --resume" if latest is not None else
           "no checkpoint was written: free space, or choose a run_dir on a larger disk"))


class _Loop:
    def __init__(self, cfg, mngr, batches, train_step, eval_step, evals, batch_sharding, progress,
                 stop=None, on_policy=None):
        self.cfg, self.mngr, self.batches = cfg, mngr, batches
        self.on_policy = on_policy  # distill: (params, host batch, step) -> (batch, 0 / 1)
        self.stop = stop or guard.StopRequest()
        self.train_step, self.eval_step, self.evals = train_step, eval_step, evals
        self.batch_sharding = batch_sharding
        self.progress = progress
        lead = jax.process_index() == 0  # one writer; TensorBoard events beside the JSONL
        self.log = MetricsLog(os.path.join(cfg.run_dir, "metrics.jsonl") if lead else os.devnull,
                              cfg.run_dir if lead and cfg.train.tensorboard else None)
        self.devices, local = mesh_devices(batch_sharding.mesh)
        self.peak, _ = device_peak(cfg.model.dtype, cfg.train.peak_flops, sharing=local)
        self.flops_per_token = model_flops_per_token(cfg.model, cfg.data.seq_len)
        self.rollouts = None  # GRPO, PPO: train/rollout.py's Rollouts (batches from the state)
        self.tasks = None  # train.eval_tasks: (lm-eval's task manager, the tokenizer)

    def next_batch(self, state, step):
        """(the device batch of optimizer step `step`, host metrics of making it): the
        data's, GRPO's (PPO's) rollouts, or the data's with distill's on-policy samples."""
        if self.rollouts is not None:
            host, metrics = self.rollouts.batch(state, step)
            return put_batch(host, self.batch_sharding), metrics
        host, metrics = next(self.batches), {}
        if self.on_policy is not None:  # the student's samples, from the live params
            host, sampled = self.on_policy(state.params, host, step)
            metrics = {"on_policy": sampled}
        return put_batch(host, self.batch_sharding), metrics

    def timed_step(self, state, batch, made):
        """The train step; for GRPO and PPO its metrics with the rollout's, and the rollout's
        share of the step's time (the step waited for: the next rollout reads its params)."""
        t0 = time.perf_counter()
        state, metrics = self.train_step(state, batch)
        if self.rollouts is None:
            return state, {**metrics, **made}
        jax.block_until_ready(metrics["loss"])
        rollout = made.pop("rollout_s", 0.0)
        update = time.perf_counter() - t0
        return state, {**metrics, **made, "rollout_share": rollout / (rollout + update),
                       "step_s": rollout + update}

    def evaluate(self, state) -> dict:
        """Held-out means: {"loss": ...} plus, for DPO, the reward metrics."""
        if not self.evals:  # GRPO, PPO: no held-out loss (rewards are logged per step)
            return {}
        sums = jax.device_get([self.eval_step(state, b) for b in self.evals])
        count = max(sum(float(s[1]) for s in sums), 1.0)
        out = {"loss": sum(float(s[0]) for s in sums) / count}
        for key in sums[0][2]:
            out[key] = sum(float(s[2][key]) for s in sums) / count
        if "desirable" in out:  # kto: rewards are means over their kind of row
            from .kto import kto_metrics
            totals = {k: sum(float(s[2][k]) for s in sums) for k in sums[0][2]}
            out.update({k: float(v) for k, v in kto_metrics(totals, count).items()})
        return out

    def checkpoint(self, state):
        """Save `state` (async), or a one-line JaxlmError when it is not finite."""
        if not guard.all_finite((state.params, state.opt_state)):
            raise JaxlmError(
                f"training diverged: the state at step {int(state.step)} is not finite; it was "
                f"not saved (latest checkpoint: step {self.mngr.latest_step()})")
        need = _checkpoint_bytes(state, self.cfg.run_dir)
        free = shutil.disk_usage(self.cfg.run_dir).free
        if free < need:  # refused before orbax writes a byte (and logs a failure per thread)
            raise _disk_full(self.cfg, self.mngr, state)
        checkpoint.save(self.mngr, state, _all_data_states(self.batches.get_state()))

    def final_save(self, state, start: int) -> tuple[int | None, str]:
        """The save on an interrupt, with SIGINT/SIGTERM masked until it is on disk:
        (the step saved or None, why not)."""
        step = int(state.step)
        if step == start and start == 0:
            return None, "before the first step finished"
        if any(x.is_deleted() for x in jax.tree.leaves((state.params, state.opt_state))):
            return None, f"at step {step} (its buffers were donated to a step that did not end)"
        with guard.masked_sigint():
            try:
                self.checkpoint(state)
                self.mngr.wait_until_finished()
            except JaxlmError as e:
                return None, f"at step {step} ({e})"
        return step, ""

    def run(self, state, stop_after):
        tcfg = self.cfg.train
        start = int(state.step)
        end = tcfg.steps if stop_after is None else min(tcfg.steps, stop_after)
        summary = {"start_step": start, "end_step": end, "eval": []}
        if start == 0 and self.evals:
            summary["eval"].append(self._eval(state, 0))
        bar = tqdm(total=end, initial=start, disable=not self.progress, dynamic_ncols=True,
                   desc="train")
        pending, t_mark, step = [], None, start
        self.stop.arm()  # a signal now ends the current step, then stops
        stopping = False
        try:
            while step < end and not stopping:
                batch, made = self.next_batch(state, step)
                state, metrics = self.timed_step(state, batch, made)
                step += 1
                pending.append((step, metrics))
                eval_due = step % tcfg.eval_every == 0 or step == tcfg.steps
                save_due = step % tcfg.checkpoint_every == 0 or step == end
                if eval_due or save_due or step % tcfg.log_every == 0:
                    rows, pending = pending, []
                    self._flush(rows, t_mark, bar)
                    if eval_due and (self.evals or self.tasks):
                        record = self._eval(state, step)
                        if record is not None and "eval_loss" in record:
                            summary["eval"].append(record)
                    if save_due:
                        self.checkpoint(state)
                    t_mark = time.perf_counter()  # the first interval holds the compile
                stopping = self._agree_stop(step)
            if stopping:  # asked to stop: log, save, then report
                self._flush_on_exit(pending, bar)
                pending = []
                e = self.stop.interrupt()
                e.saved_step, e.reason = self.final_save(state, start)
                raise e
        except KeyboardInterrupt as e:
            self._flush_on_exit(pending, bar)
            pending = []
            if not hasattr(e, "saved_step"):
                e.saved_step, e.reason = self.final_save(state, start)
            raise
        finally:
            self._flush_on_exit(pending, bar)  # any exit: no logged step is lost
            bar.close()
        summary["final_step"] = int(state.step)
        return summary

    def _agree_stop(self, step) -> bool:
        """Whether every process stops after `step`. One process: its own signal. Several:
        at every train.log_every-th step all combine their flags (one tiny allgather),
        so all stop at the same step and none waits in a collective alone."""
        if jax.process_count() == 1:
            return self.stop.signum is not None
        if step % self.cfg.train.log_every:
            return False
        from jax.experimental import multihost_utils
        mine = np.int32(self.stop.signum or 0)
        signums = np.asarray(multihost_utils.process_allgather(mine)).reshape(-1)
        if not signums.any():
            return False
        if self.stop.signum is None:  # another process's signal: stop the same way
            self.stop.signum = int(signums.max())
        return True

    def _flush_on_exit(self, pending, bar):
        if pending:
            try:
                self._flush(pending, None, bar, check=False)
            except Exception:  # noqa: BLE001 - the loop's own error is the one to report
                pass

    def _flush(self, pending, t_mark, bar, check: bool = True):
        """Fetch the pending steps' metrics (the loop's only host sync) and log them."""
        rows = jax.device_get(pending)
        speed = {}
        if t_mark is not None:
            tokens = self.cfg.data.batch_size * self.cfg.data.seq_len * len(rows)
            tps = tokens / (time.perf_counter() - t_mark)
            speed = {"tokens_per_s": tps,
                     "mfu": mfu(tps, self.flops_per_token, self.devices, self.peak)}
        for i, (s, m) in enumerate(rows):
            self.log.write({"step": s, **m, **(speed if i == len(rows) - 1 else {})})
        step, last = rows[-1]
        bar.update(len(rows))
        if check:
            _check_diverged(rows, self.cfg.train.max_skipped_steps, self.mngr.latest_step)
        postfix = {"loss": f"{last['loss']:.3f}"}
        if speed:
            postfix.update({"tok/s": f"{speed['tokens_per_s']:.0f}", "mfu": f"{speed['mfu']:.0%}"})
        bar.set_postfix(postfix)

    def _eval(self, state, step):
        means = self.evaluate(state)
        record, line = {"step": step}, f"step {step}:"
        if means:
            loss = means.pop("loss")
            record.update(eval_loss=loss, **{f"eval_{k}": v for k, v in means.items()})
            line += f" eval loss {loss:.4f}"
            if is_token_cross_entropy(self.cfg.train.objective):  # not for a preference loss
                record["eval_perplexity"] = math.exp(min(loss, 50.0))
                line += f", perplexity {record['eval_perplexity']:.2f}"
        if self.tasks:
            scores = self._task_scores(state)
            record.update(scores)
            line += "".join(f" {k[len('eval_'):]} {v:.4f}" for k, v in scores.items())
        if len(record) == 1:
            return None
        self.log.write(record)
        if self.progress:
            tqdm.write(line)
        return record


    def _task_scores(self, state) -> dict:
        """train.eval_tasks on the training params (LoRA: merged; PPO: the policy's):
        {"eval_<task>/<metric>": value}."""
        from ..infer.evaluate import run_tasks
        from .rollout import policy_params
        manager, tokenizer = self.tasks
        t = self.cfg.train
        got = run_tasks(policy_params(self.cfg, state), self.cfg.model, tokenizer,
                        list(t.eval_tasks), manager=manager, batch_size=self.cfg.data.batch_size,
                        limit=t.eval_task_limit or None, mesh=self.batch_sharding.mesh,
                        rules=self.cfg.mesh.rules)
        return {f"eval_{task}/{metric.split(',')[0]}": float(v)
                for task, metrics in got["tasks"].items() for metric, v in metrics.items()
                if not metric.split(",")[0].endswith("_stderr")}


def _eval_tasks(cfg: Config, tokenizer):
    """(lm-eval's task manager, the tokenizer) for train.eval_tasks, checked; None
    without them."""
    if not cfg.train.eval_tasks:
        return None
    if cfg.model.family != "decoder":
        raise ConfigError(f"train.eval_tasks: lm-eval tasks score causal decoders, not a "
                          f"{cfg.model.family} model")
    if tokenizer is None:
        raise ConfigError("train.eval_tasks needs the run's tokenizer (data.tokenizer)")
    from ..infer.evaluate import check_tasks, task_manager
    try:
        manager = task_manager(cfg.train.eval_task_path or None, cfg.train.eval_tasks)
    except ImportError:
        raise ConfigError("train.eval_tasks needs lm-eval: pip install 'jaxlm[eval]'") from None
    check_tasks(manager, cfg.train.eval_tasks)
    return manager, tokenizer


def _data(cfg: Config):
    """(training batch iterator, global eval batches, tokenizer) for train.objective."""
    process = dict(process_index=jax.process_index(), process_count=jax.process_count())
    if cfg.train.objective in ("grpo", "ppo"):
        return _grpo_data(cfg)
    kind = cfg.train.objective
    if kind == "distill":  # prompt/completion records: SFT batches; else raw text
        from .distill import data_kind
        kind = data_kind(cfg.data)
    if kind in ("sft", "dpo", "kto", "classify", "reward"):
        from ..model.chat import resolve_chat_template
        from .sft import finetune_data
        tokenizer = _tokenizer(cfg, None)
        template = resolve_chat_template(cfg.data.chat_template, _template_dir(cfg))
        batches, evals = finetune_data(kind, cfg, tokenizer, template=template,
                                       batch_size=local_batch_size(cfg.data.batch_size), **process)
        stats = getattr(batches, "stats", {})
        if stats and jax.process_index() == 0:
            print(f"{kind}: {stats.get('examples', '?')} examples, "
                  f"{stats.get('truncated', 0)} truncated to data.seq_len={cfg.data.seq_len}, "
                  f"{stats.get('dropped', 0)} dropped ("
                  + ("no token" if cfg.train.objective == "classify" else
                     "no loss token within the row") + ")", flush=True)
            if stats.get("identical"):
                print(f"warning: {stats['identical']} of {stats['examples']} preference pairs "
                      "have the same tokens as chosen and as rejected: they add nothing to "
                      "the loss", file=sys.stderr, flush=True)
        return batches, evals, tokenizer
    train_docs, eval_docs = open_sources(cfg.data)  # lazy: read as the pipeline streams
    tokenizer = _tokenizer(cfg, train_docs)
    batches = make_batches(train_docs, tokenizer, seq_len=span.row_length(cfg),
                           batch_size=local_batch_size(cfg.data.batch_size), seed=cfg.data.seed,
                           shuffle_rows=cfg.data.shuffle_rows, **process)
    batches = span.wrap_batches(cfg, tokenizer, batches)  # span: T5 corruption on the host
    evals = span.map_batches(cfg, tokenizer, eval_batches(
        eval_docs, tokenizer, seq_len=span.row_length(cfg), batch_size=cfg.data.batch_size,
        num_batches=cfg.train.eval_batches))
    return batches, list(evals), tokenizer


def _teacher_config(cfg: Config):
    """The distillation teacher's ModelConfig (static in the steps), or None."""
    if cfg.train.objective != "distill":
        return None
    from .distill import teacher_config
    return teacher_config(cfg.train)


def _critic_config(cfg: Config):
    """PPO's value model's ModelConfig (static in the steps), or None."""
    if cfg.train.objective != "ppo":
        return None
    from .ppo import value_config
    return value_config(cfg)


def _grpo_data(cfg: Config):
    """(the Rollouts batch source, no eval batches, tokenizer) of a GRPO or PPO run."""
    from ..infer.text import generation_settings
    from ..model.chat import resolve_chat_template
    from .ppo import PPORollouts
    from .rollout import Rollouts, load_prompt_records
    objective = cfg.train.objective
    if jax.process_count() > 1:
        raise ConfigError(f"train.objective={objective} runs on one process for now")
    tokenizer = _tokenizer(cfg, None)
    template = resolve_chat_template(cfg.data.chat_template, _template_dir(cfg))
    records = load_prompt_records(cfg.data.corpus, max_records=cfg.data.max_docs or None,
                                  seq_len=cfg.data.seq_len)
    eos = generation_settings(cfg.train.init_from or cfg.run_dir, tokenizer).eos_ids
    source = PPORollouts if objective == "ppo" else Rollouts
    rollouts = source(cfg, tokenizer, template, records, eos_ids=eos)
    if jax.process_index() == 0:
        print(f"{objective}: {len(records)} prompts, {rollouts.truncated} cut to data.seq_len - "
              f"max_completion_length={rollouts.prompt_len} tokens", flush=True)
    return rollouts, [], tokenizer


def _template_dir(cfg: Config):
    """Where the run's chat template and tokenizer files come from: the run dir once it
    holds a copy, else train.init_from."""
    own = os.path.join(cfg.run_dir, "tokenizer_config.json")
    return cfg.run_dir if os.path.exists(own) else (cfg.train.init_from or None)


def _peft_adapters(cfg: Config, mesh, tx, state):
    """`state` with train.lora.init_from's peft adapters as its params (fresh moments)."""
    from ..model.peft import read_peft
    from .lora import lora_specs
    sh = state_shardings(cfg, mesh, tx)
    adapters = read_peft(cfg.train.lora.init_from, cfg.model, lora_specs(cfg.model, cfg.train))
    if cfg.train.objective == "ppo":  # the policy's adapters, beside the value model
        params = {**state.params, "policy": jax.device_put(adapters, sh.params["policy"])}
    else:
        params = jax.device_put(adapters, sh.params)
    return state.replace(params=params,
                         opt_state=jax.jit(tx.init, out_shardings=sh.opt_state)(params))


def _pin_base(cfg: Config, resume: bool, accept: bool) -> tuple[int | None, dict | None]:
    """(the step of train.init_from to read, base.json's record to write) of a run
    that reads its base again later (LoRA, DPO); (None, None) for other runs. A new
    run records the base; a resume checks it (a changed base: CheckpointError)."""
    if not (cfg.train.init_from and needs_frozen(cfg)):
        return None, None
    if not resume:
        record = pinned.record(cfg.train.init_from)
        return record["step"], record
    _, step, record = pinned.resolve(cfg.run_dir, cfg.train.init_from, accept=accept)
    return step, record


def _pin_frozen(cfg: Config, resume: bool, accept: bool) -> dict[str, tuple[int | None, dict]]:
    """_pin_base for the other frozen models a run reads again on resume: {record file:
    (the step to read, the record to write)}: a distillation run's teacher
    (teacher.json), a PPO run's reward model (reward_model.json)."""
    path = {"distill": (pinned.TEACHER, cfg.train.distill.teacher),
            "ppo": (pinned.REWARD_MODEL, cfg.train.ppo.reward_model_path)}.get(cfg.train.objective)
    if path is None:
        return {}
    name, model = path
    if not resume:
        record = pinned.record(model)
        return {name: (record["step"], record)}
    _, step, record = pinned.resolve(cfg.run_dir, model, accept=accept, name=name)
    return {name: (step, record)}


def _initial_params(cfg: Config, mesh, step: int | None = None):
    """train.init_from's params (of `step`, for a jaxlm dir; default its latest), read
    straight into their shardings, or None (random init)."""
    if not cfg.train.init_from:
        return None
    from ..api import load_params
    from ..model.params import logical_axes
    from ..sharding.rules import tree_shardings
    from ..api import model_config_of
    mcfg = cfg.model
    fresh_head = mcfg.num_labels and not model_config_of(cfg.train.init_from).num_labels
    if fresh_head:  # a reward model from a causal LM: its body, a new score head
        mcfg = dataclasses.replace(mcfg, num_labels=0, pad_token_id=-1, label_names=())
    shardings = tree_shardings(mesh, logical_axes(model_specs(mcfg)), cfg.mesh.rules)
    params = load_params(cfg.train.init_from, mcfg, shardings, step)
    if fresh_head:
        from .reward import fresh_score_head
        params = fresh_score_head(params, cfg.model, cfg.train.seed)
    return params


def _check_diverged(rows, limit: int, latest=lambda: None):
    """A one-line JaxlmError at the first logged step that ends `limit` non-finite
    steps in a row (each skipped on device: `consecutive_skipped` in its metrics);
    `latest()`: the latest checkpoint step, named in the message."""
    for step, m in rows:
        if int(m.get("consecutive_skipped", 0)) >= limit:
            bad = {k: float(m[k]) for k in ("loss", "grad_norm") if k in m
                   and not math.isfinite(float(m[k]))}
            what = ", ".join(f"{k} is {v}" for k, v in bad.items()) or "the update is not finite"
            saved = "" if latest() is None else f"; latest checkpoint: step {latest()}"
            raise JaxlmError(f"training diverged at step {step}: {limit} non-finite steps in a "
                             f"row were skipped (train.max_skipped_steps={limit}; last: {what})"
                             f"{saved}")


def _resumed(cfg: Config, mngr, step: int):
    """After restoring `step`: later checkpoints moved aside, later metrics dropped."""
    if jax.process_index() != 0:
        return
    moved = checkpoint.set_aside_after(mngr, cfg.run_dir, step)
    if moved:
        print(f"resuming step {step}: moved the later checkpoints {moved} to "
              f"{os.path.join(cfg.run_dir, checkpoint.SET_ASIDE)}", flush=True)
    guard.truncate_metrics(os.path.join(cfg.run_dir, "metrics.jsonl"), step)


def _all_data_states(state: dict) -> dict:
    """Every process's data-iterator state (each reads its own share), gathered
    so that the checkpoint, written once, holds them all."""
    if jax.process_count() == 1:
        return {"processes": [state]}
    from jax.experimental import multihost_utils
    blob = np.frombuffer(json.dumps(state).encode(), np.uint8)
    sizes = np.asarray(multihost_utils.process_allgather(np.array([blob.size]))).reshape(-1)
    padded = np.zeros(int(sizes.max()), np.uint8)
    padded[:blob.size] = blob
    blobs = np.asarray(multihost_utils.process_allgather(padded))
    return {"processes": [json.loads(bytes(blobs[i, :n]).decode()) for i, n in enumerate(sizes)]}


def _own_data_state(saved: dict) -> dict:
    states = saved.get("processes") if isinstance(saved, dict) else None
    if not isinstance(states, list):
        raise CheckpointError("the checkpoint's data iterator state is missing or corrupt")
    if len(states) != jax.process_count():
        raise CheckpointError(
            f"the checkpoint was written by {len(states)} processes; resume it with "
            f"{len(states)} (jaxlm.load reads its params with any number)")
    return states[jax.process_index()]


# train.* keys that decide what a checkpoint holds (which params train, which
# optimizer state): a resume must keep them
_STATE_TRAIN_KEYS = ("objective", "lora.rank", "lora.targets", "ppo.value_init")


def _check_run_dir(cfg: Config, resume: bool):
    latest = checkpoint.latest_step(cfg.run_dir)
    if resume:
        if latest is None:
            raise CheckpointError(f"--resume: no checkpoint to resume in {cfg.run_dir}")
        # before anything is written: the model, the data and the train keys that shape
        # the checkpoint's state must be the run's (config.yaml is not rewritten first)
        saved = read_run_config(cfg.run_dir)
        for section in ("model", "data", "train"):
            a, b = (flatten(to_dict(getattr(c, section))) for c in (saved, cfg))
            for key in a:
                if a[key] != b[key] and (section != "train" or key in _STATE_TRAIN_KEYS):
                    raise ConfigError(
                        f"--resume: {section}.{key}={b[key]!r} differs from the run's "
                        f"{a[key]!r} ({os.path.join(cfg.run_dir, CONFIG_FILE)}); its "
                        "checkpoints hold that run's state: start a new run_dir to change it")
    elif latest is not None:
        raise ConfigError(f"run_dir {cfg.run_dir} already holds checkpoints (latest step {latest}): "
                          "pass --resume to continue it, or choose another run_dir")


def _write_config(cfg: Config):
    path = os.path.join(cfg.run_dir, CONFIG_FILE)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        yaml.safe_dump(to_dict(cfg), f, sort_keys=False)
    os.replace(tmp, path)


def read_run_config(run_dir: str) -> Config:
    path = os.path.join(run_dir, CONFIG_FILE)
    if not os.path.isfile(path):
        raise CheckpointError(f"{run_dir} is not a jaxlm run dir: {CONFIG_FILE} is missing")
    try:
        with open(path) as f:
            return config_from_dict(yaml.safe_load(f) or {})
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark else ""
        raise CheckpointError(f"{path} is corrupt: not valid YAML{where}") from None
    except ConfigError as e:
        raise CheckpointError(f"{path} is corrupt: {e}") from None


def _tokenizer(cfg: Config, train_docs):
    if train_docs is None or cfg.train.init_from:  # a checkpoint's weights: its own tokenizer
        return _checkpoint_tokenizer(cfg)
    first = train_docs if not isinstance(train_docs, list) else train_docs[0][0]
    path = cfg.data.tokenizer or first.tokenizer_path or os.path.join(cfg.run_dir, TOKENIZER_FILE)
    if cfg.data.tokenizer or first.tokenizer_path or os.path.exists(path):
        tok = load_tokenizer(path)
    elif jax.process_count() > 1:
        raise ConfigError("multi-host runs need a trained tokenizer: set data.tokenizer=PATH "
                          f"(or put {TOKENIZER_FILE} in the run dir)")
    else:
        # mlm: the last id is [MASK]; span: the top ids are the sentinels
        reserved = 1 if cfg.train.objective == "mlm" else span.reserved_ids(cfg)
        texts = sample_texts(first, cfg.data.tokenizer_max_chars, cfg.data.seed)
        tok = train_sentencepiece(texts, cfg.model.vocab_size - reserved, cfg.run_dir,
                                  max_chars=cfg.data.tokenizer_max_chars, seed=cfg.data.seed)
    if tok.vocab_size > cfg.model.vocab_size:
        raise ConfigError(f"the tokenizer has {tok.vocab_size} tokens but model.vocab_size="
                          f"{cfg.model.vocab_size}")
    if (cfg.data.tokenizer or first.tokenizer_path) and jax.process_index() == 0:  # a copy with the run
        tok.save(cfg.run_dir)
    return tok


def _checkpoint_tokenizer(cfg: Config):
    """train.init_from's tokenizer (a jaxlm run's tokenizer.model, an HF dir's
    tokenizer.json / tokenizer.model), else data.tokenizer, copied into the run dir.
    The weights of train.init_from were trained with its tokenizer: a data.tokenizer
    that encodes differently is a ConfigError naming both."""
    source = cfg.train.init_from or cfg.data.tokenizer
    if not source:
        raise ConfigError(f"train.objective={cfg.train.objective} needs a tokenizer: set "
                          "train.init_from=CHECKPOINT (its tokenizer is used) or data.tokenizer=PATH")
    tok = load_tokenizer(source)
    if cfg.train.init_from and cfg.data.tokenizer:
        from .prepare import tokenizer_digest
        given = load_tokenizer(cfg.data.tokenizer)
        if tokenizer_digest(given) != tokenizer_digest(tok):
            raise ConfigError(
                f"data.tokenizer={cfg.data.tokenizer} is not the tokenizer of train.init_from="
                f"{cfg.train.init_from} (digests {tokenizer_digest(given)} and "
                f"{tokenizer_digest(tok)}); the checkpoint's weights need its own: leave "
                "data.tokenizer out")
    if tok.vocab_size > cfg.model.vocab_size:
        raise ConfigError(f"the tokenizer of {source} has {tok.vocab_size} tokens but "
                          f"model.vocab_size={cfg.model.vocab_size}")
    if jax.process_index() == 0:  # the run dir is self-contained
        tok.save(cfg.run_dir)
        # the chat template and generation_config.json (every EOS id) go along
        copy_companions(source, cfg.run_dir)
    return tok


__all__ = ["train", "read_run_config"]
