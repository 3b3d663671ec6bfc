"""EvolvingIsolation: refresh schedule and semantics (frozen set rule, counts, Jaccard, moments of
released elements), task switching under MaskedAdamW (frozen elements bit-exact), the
task-homogeneous batch sampler, and the TrainerCallback in a short transformers Trainer run."""

from __future__ import annotations

import pytest
import torch

from cpift_fast import MaskedAdamW, ParamMask
from cpift_fast.evolving import EvolvingIsolation, TaskBatchSampler, jaccard, trainer_callback
from cpift_fast.importance import ImportanceTracker

TASKS = ("a", "b", "c")


def _setup(policy="evolving", reset_on_unfreeze=True, warmup=2, interval=3, fused=False):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 16), torch.nn.Linear(16, 4))
    tracker = ImportanceTracker(model.named_parameters(), TASKS, beta=0.9)
    opt = MaskedAdamW(model.named_parameters(), lr=1e-2, reset_on_unfreeze=reset_on_unfreeze,
                      importance=tracker if fused else None)
    iso = EvolvingIsolation(opt, tracker, ratio=0.1, interval=interval, warmup=warmup, policy=policy)
    return model, opt, tracker, iso


def _backward(model, task, step):
    gen = torch.Generator().manual_seed(1000 * TASKS.index(task) + step)
    x = torch.randn(8, 16, generator=gen) * (1 + TASKS.index(task))
    model.zero_grad()
    model(x).square().mean().backward()


def _snapshot(model, opt):
    out = {}
    for name, p in model.named_parameters():
        state = opt.state.get(p, {})
        out[name] = [p.detach().clone()] + [state[k].clone() for k in ("exp_avg", "exp_avg_sq") if k in state]
    return out


def _bools(mask: ParamMask):
    return torch.cat([b.reshape(-1) for b in mask.to_bool().values()])


def test_refresh_schedule_frozen_rule_and_log():
    model, opt, tracker, iso = _setup(warmup=3)
    refreshed = []
    for step in range(9):
        task = TASKS[step % 3]
        _backward(model, task, step)
        iso.before_step(task)
        opt.step()
        before = len(iso.log)
        iso.after_step()
        if len(iso.log) > before:
            refreshed.append(iso.step)
    assert refreshed == [3, 6, 9]  # warmup, then every interval
    masks = {t: _bools(iso.masks[t]) for t in TASKS}
    for t in TASKS:
        others = torch.zeros_like(masks[t])
        for s in TASKS:
            if s != t:
                others |= masks[s]
        assert torch.equal(_bools(iso.frozen[t]), others & ~masks[t])
    numel = sum(p.numel() for p in model.parameters())
    for rec in iso.log:
        assert rec["protected"] == round(0.1 * numel)
        assert rec["protected"] == rec["kept"] + rec["added"]
    by_task = {t: [r for r in iso.log if r["task"] == t] for t in TASKS}
    for t, recs in by_task.items():
        assert recs[0]["kept"] == 0 and recs[0]["released"] == 0 and recs[0]["jaccard_first"] == 1.0
        for prev, rec in zip(recs, recs[1:]):
            assert prev["protected"] == rec["kept"] + rec["released"]
        last = iso.masks[t]
        assert recs[-1]["jaccard_first"] == jaccard(iso.first[t], last)
    assert jaccard(ParamMask.zeros(last.layout), ParamMask.zeros(last.layout)) == 0.0


@pytest.mark.parametrize("policy", ("evolving", "static", "none"))
@pytest.mark.parametrize("fused", [False, True])
def test_task_steps_keep_their_frozen_set_bit_exact(policy, fused):
    """On every step after warmup the optimizer holds the active task's frozen set — the refresh's
    own mask, not a copy — and those elements (param, exp_avg, exp_avg_sq) do not change in the
    step; with the EMA fused into the step (MaskedAdamW(importance=tracker)) as with update()."""
    model, opt, tracker, iso = _setup(policy=policy, fused=fused)
    schedule = ["a", "a", "b", "c", "b", "a", "c", "c", "b", "a", "b", "c"]
    frozen_elements = 0
    for step, task in enumerate(schedule):
        _backward(model, task, step)
        iso.before_step(task)
        frozen = iso.frozen[task] if iso.frozen is not None else None
        if frozen is None:
            assert opt.frozen_mask() is None
        else:
            assert opt.frozen_mask() == frozen and opt._frozen is frozen  # switched without a copy
            frozen_elements += frozen.count()
        before = _snapshot(model, opt)
        opt.step()
        after = _snapshot(model, opt)
        for name, bits in (frozen.to_bool().items() if frozen is not None else ()):
            for old, new in zip(before[name], after[name]):
                assert torch.equal(old[bits], new[bits]), (step, task, name)
        iso.after_step()
    assert (frozen_elements > 0) == (policy != "none")
    if policy == "none":
        assert iso.masks is None and not iso.log
    else:
        # static: a, b, c have masks after step 2 (b and c, untrained then, empty); b and c get theirs at 5
        expected = {"evolving": {2, 5, 8, 11}, "static": {2, 5}}[policy]
        assert {r["step"] for r in iso.log} == expected


def _run(iso, model, opt, schedule):
    for step, task in enumerate(schedule):
        _backward(model, task, step)
        iso.before_step(task)
        opt.step()
        iso.after_step()


def _by_step(iso):
    out = {}
    for r in iso.log:
        out.setdefault(r["step"], {})[r["task"]] = r
    return out


@pytest.mark.parametrize("policy", ("evolving", "static"))
def test_jaccard_first_is_taken_from_the_first_non_empty_mask(policy):
    """c has no step before the first refresh (step 2): empty mask, jaccard_first None until c has
    a mask, then 1.0 against that mask and iso.first["c"] is it."""
    model, opt, tracker, iso = _setup(policy=policy, warmup=2, interval=3)
    _run(iso, model, opt, ["a", "b", "a", "c", "a", "b", "c", "a", "b", "c", "a"])  # refreshes at 2, 5, (8, 11)
    recs = _by_step(iso)
    assert recs[2]["c"]["protected"] == 0 and recs[2]["c"]["jaccard_first"] is None
    assert recs[2]["a"]["jaccard_first"] == 1.0 and recs[2]["b"]["jaccard_first"] == 1.0
    assert recs[5]["c"]["protected"] > 0 and recs[5]["c"]["jaccard_first"] == 1.0
    assert recs[5]["c"]["jaccard_prev"] == 0.0  # previous mask empty
    if policy == "evolving":
        assert recs[11]["c"]["jaccard_first"] == jaccard(iso.first["c"], iso.masks["c"])
        assert sorted(recs) == [2, 5, 8, 11]
    else:
        assert iso.first["c"] == iso.masks["c"]
    assert all(r["jaccard_first"] is not None for r in iso.log if r["step"] >= 5)


def test_static_gives_an_untrained_task_its_mask_once_at_the_first_refresh_point_it_has_importance():
    model, opt, tracker, iso = _setup(policy="static", warmup=2, interval=3)
    # c trains first at step 6 (index 5): not at 6, at the next schedule point 8; none after
    _run(iso, model, opt, ["a", "b", "a", "b", "a", "c", "a", "b", "c", "a", "b", "c", "a", "b"])
    recs = _by_step(iso)
    assert sorted(recs) == [2, 8]
    first = {t: recs[2][t] for t in TASKS}
    assert first["a"]["protected"] > 0 and first["b"]["protected"] > 0 and first["c"]["protected"] == 0
    assert iso.first["a"] == iso.masks["a"] and iso.first["b"] == iso.masks["b"]  # never recomputed
    late = recs[8]
    for t in ("a", "b"):  # unchanged masks; their frozen sets now hold c's mask
        assert late[t]["kept"] == late[t]["protected"] == first[t]["protected"]
        assert late[t]["added"] == late[t]["released"] == 0 and late[t]["jaccard_prev"] == 1.0
        assert _bools(iso.frozen[t]).tolist() == _bools((iso.masks["c"] | iso.masks["a"] | iso.masks["b"])
                                                         - iso.masks[t]).tolist()
    assert late["c"]["added"] == late["c"]["protected"] > 0 and late["c"]["jaccard_first"] == 1.0
    assert iso.first["c"] == iso.masks["c"]


def test_applied_marks_refreshes_whose_masks_a_later_step_used():
    model, opt, tracker, iso = _setup(warmup=2, interval=2)
    _run(iso, model, opt, ["a", "b", "c", "a"])  # refreshes after steps 2 and 4 (the last)
    assert [(r["step"], r["applied"]) for r in iso.log] == [(2, True)] * 3 + [(4, False)] * 3
    _run(iso, model, opt, ["b"])  # one more step: the step-4 masks were used
    assert all(r["applied"] for r in iso.log)


@pytest.mark.parametrize("reset", (True, False))
def test_released_elements_follow_reset_on_unfreeze(reset):
    model, opt, tracker, iso = _setup(reset_on_unfreeze=reset, warmup=1, interval=2)
    steps = ["a", "b", "c", "a", "b", "c"]
    for step, task in enumerate(steps[:3]):  # refresh after step 1 and step 3
        _backward(model, task, step)
        iso.before_step(task)
        opt.step()
        iso.after_step()
    old_frozen = dict(iso.frozen)
    # importance shifts: task "a" now sees very different inputs
    for step in range(3, 5):
        _backward(model, "a", 100 + step)
        iso.before_step("a")
        opt.step()
        moments = {n: opt.state[p]["exp_avg"].clone() for n, p in model.named_parameters()}
        iso.after_step()
    assert iso.log[-1]["step"] == 5
    released = ParamMask.zeros(old_frozen["a"].layout)
    for t in TASKS:
        released = released | (old_frozen[t] - iso.frozen[t])
    assert released.count() > 0
    for name, p in model.named_parameters():
        bits = released.to_bool()[name]
        now = opt.state[p]["exp_avg"]
        if reset:
            assert not now[bits].any()
        else:
            assert torch.equal(now[bits], moments[name][bits])
        assert torch.equal(now[~bits], moments[name][~bits])  # everything else untouched by the refresh


def test_bad_arguments_name_themselves():
    model, opt, tracker, _ = _setup()
    for kwargs, match in ((dict(policy="dynamic"), "policy"), (dict(ratio=1.5), "ratio"), (dict(interval=0), "interval"),
                          (dict(warmup=-1), "warmup")):
        args = dict(ratio=0.1, interval=2, warmup=0) | kwargs
        with pytest.raises(ValueError, match=match):
            EvolvingIsolation(opt, tracker, **args)
    with pytest.raises(TypeError, match="MaskedAdamW"):
        EvolvingIsolation(torch.optim.SGD(model.parameters(), lr=0.1), tracker, 0.1, 2)
    with pytest.raises(ValueError, match="batch_size"):
        TaskBatchSampler(["a"], 0)


def test_task_batch_sampler():
    tasks = ["a"] * 40 + ["b"] * 20 + ["c"] * 8
    sampler = TaskBatchSampler(tasks, batch_size=4, seed=3)
    batches = list(sampler)
    assert len(batches) == len(sampler) == 10 + 5 + 2
    assert sorted(i for b in batches for i in b) == list(range(len(tasks)))
    order = [tasks[b[0]] for b in batches]
    assert all(len({tasks[i] for i in b}) == 1 for b in batches)
    assert order == [sampler.task_of_step(k) for k in range(len(batches))]
    for k in range(1, len(order) + 1):  # every prefix holds each task in proportion to its size, +- 1
        for t, n in (("a", 10), ("b", 5), ("c", 2)):
            assert abs(order[:k].count(t) - k * n / 17) <= 1 + 1e-9
    second = list(sampler)  # the next epoch: another order, predicted by task_of_step
    assert second != batches
    assert [tasks[b[0]] for b in second] == [sampler.task_of_step(17 + k) for k in range(17)]
    assert list(TaskBatchSampler(tasks, batch_size=4, seed=3)) == batches
    grouped = TaskBatchSampler(tasks, batch_size=4, seed=3, accumulation=2)
    pairs = list(grouped)
    assert len(pairs) == 2 * (5 + 2 + 1)
    for k in range(0, len(pairs), 2):
        assert tasks[pairs[k][0]] == tasks[pairs[k + 1][0]] == grouped.task_of_step(k // 2)


def test_trainer_callback_in_a_short_trainer_run(tmp_path):
    transformers = pytest.importorskip("transformers")
    from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainingArguments

    cfg = LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=16)
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg)
    names = ("x", "y")
    data = [{"input_ids": torch.randint(1 + 15 * (i % 2), 16 + 15 * (i % 2), (8,)), "task": names[i % 2]}
            for i in range(24)]
    sampler = TaskBatchSampler([d["task"] for d in data], batch_size=4, seed=0)
    opt = MaskedAdamW(model.named_parameters(), lr=1e-3)
    tracker = ImportanceTracker(model.named_parameters(), names, state_dtype=torch.bfloat16)
    iso = EvolvingIsolation(opt, tracker, ratio=0.05, interval=2, warmup=2)
    seen = []

    def collate(items):
        seen.append({d["task"] for d in items})
        ids = torch.stack([d["input_ids"] for d in items])
        return {"input_ids": ids, "labels": ids}

    class TaskTrainer(Trainer):
        def get_train_dataloader(self):
            return torch.utils.data.DataLoader(data, batch_sampler=sampler, collate_fn=collate)

    args = TrainingArguments(output_dir=str(tmp_path), max_steps=6, report_to=[], save_strategy="no",
                             logging_strategy="no", use_cpu=True, disable_tqdm=True)
    trainer = TaskTrainer(model=model, args=args, train_dataset=data, optimizers=(opt, None),
                          callbacks=[trainer_callback(iso, sampler.task_of_step)])
    trainer.train()
    assert iso.step == 6 and {r["step"] for r in iso.log} == {2, 4, 6}
    assert [s for s in seen[:6]] == [{sampler.task_of_step(k)} for k in range(6)]
    assert tracker.counts == {t: [sampler.task_of_step(k) for k in range(6)].count(t) for t in names}
    assert all(r["protected"] > 0 for r in iso.log)
