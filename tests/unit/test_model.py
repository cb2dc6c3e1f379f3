import dataclasses

import numpy as np
import pyarrow as pa
import pytest
import torch
from torch._dynamo.utils import counters

from app.config import ConfigError, ModelConfig, TaskConfig, load_config
from app.data.batch import arrow_to_batch
from app.data.schema import Columns, Schema
from torchrec.sparse.jagged_tensor import KeyedTensor

from app.model import (DenseInput, LossBalancer, MultiTaskModel, MultiTaskTrain, SparseArch, apply_chains,
                       chain_order, compile_mode)

# --- ESMM-style chains ----------------------------------------------------------------------


def test_chain_order_puts_each_task_after_its_factor():
    tasks = {"buy": TaskConfig(multiply_by="cart"), "click": TaskConfig(),
             "cart": TaskConfig(multiply_by="click")}
    assert chain_order(tasks) == [(2, 1), (0, 2)]  # cart = cart tower x click, then buy = buy tower x cart


def test_chained_probability_is_the_product():
    z = torch.randn(64, 3) * 4
    z[:4] = torch.tensor([[40.0, 40.0, -40.0], [-40.0, 40.0, 40.0], [30.0, -30.0, 0.0], [0.0, 0.0, 0.0]])
    z.requires_grad_(True)
    out = apply_chains(z, [(1, 0), (2, 1)], 3)  # p1 = s(z1) s(z0), p2 = s(z2) p1
    p = torch.sigmoid(z.double())
    torch.testing.assert_close(out[:, 0], z[:, 0])  # a task with no multiply_by is untouched
    torch.testing.assert_close(torch.sigmoid(out[:, 1]).double(), p[:, 0] * p[:, 1], atol=1e-6, rtol=1e-4)
    torch.testing.assert_close(torch.sigmoid(out[:, 2]).double(), p[:, 0] * p[:, 1] * p[:, 2],
                               atol=1e-6, rtol=1e-4)
    labels = (torch.rand(64, 3) < 0.5).float()
    loss = torch.nn.functional.binary_cross_entropy_with_logits(out, labels)
    loss.backward()
    assert torch.isfinite(out).all() and torch.isfinite(loss) and torch.isfinite(z.grad).all()


def tiny_columns(tmp_path, labels=("click", "buy")):
    Schema(labels=list(labels), dense=["d0", "d1"], categorical={"c0": 10, "c1": 7}).save(tmp_path)
    return Columns.resolve(Schema.load(tmp_path), list(labels), [], [], "test")


def tiny_table(rows=16, seed=0):
    rng = np.random.default_rng(seed)
    return pa.table({"click": rng.integers(0, 2, rows).astype(np.float32),
                     "buy": rng.integers(0, 2, rows).astype(np.float32),
                     "d0": rng.normal(size=rows).astype(np.float32),
                     "d1": rng.normal(size=rows).astype(np.float32),
                     "c0": rng.integers(0, 10, rows), "c1": rng.integers(0, 7, rows)})


def tiny_batch(columns, rows=16, seed=0):
    return arrow_to_batch(tiny_table(rows, seed), columns, np.arange(rows))


def cpu_train_module(columns, tasks, cfg, seed=0) -> MultiTaskTrain:
    """The training module with its tables on the CPU (no sharding), as a test can run it."""
    torch.manual_seed(seed)
    model = MultiTaskModel(columns, tasks, cfg)
    torch.manual_seed(seed + 1)
    model.sparse = SparseArch(columns, cfg.embedding_dim, device="cpu")
    return MultiTaskTrain(model, tasks)


CFG = ModelConfig(embedding_dim=4, num_experts=2, expert_layers=[8], tower_layers=[4])


def test_outputs_apply_the_product(tmp_path):
    """p(buy) = p(click) x the buy tower's probability, for the same weights."""
    columns = tiny_columns(tmp_path)
    batch = tiny_batch(columns)
    plain = cpu_train_module(columns, {"click": TaskConfig(), "buy": TaskConfig()}, CFG)
    chained = cpu_train_module(columns, {"click": TaskConfig(), "buy": TaskConfig(multiply_by="click")}, CFG)
    chained.load_state_dict(plain.state_dict())
    _, a = plain(batch)
    loss, b = chained(batch)
    torch.testing.assert_close(b.preds[:, 0], a.preds[:, 0])
    torch.testing.assert_close(b.preds[:, 1], a.preds[:, 0] * a.preds[:, 1])
    assert b.losses.shape == (2,) and torch.isfinite(loss)
    loss.backward()


def test_dense_input_takes_features_by_key_in_any_plan_order():
    """A sharded collection returns plan order: the head must see column order either way, and
    each feature's gradient must reach its own columns."""
    pooled = {f: torch.randn(5, d) for f, d in (("a", 2), ("b", 3), ("c", 1))}
    dense = torch.randn(5, 2)
    want = torch.cat([pooled["a"], pooled["b"], pooled["c"], dense], dim=1)
    upstream = torch.randn(want.shape)  # d loss / d input
    want_grads = dict(zip("abc", upstream[:, :6].split([2, 3, 1], dim=1)))
    inputs = DenseInput(["a", "b", "c"])
    for order in (["a", "b", "c"], ["c", "a", "b"], ["b", "c", "a"], ["c", "a", "b"]):
        values = torch.cat([pooled[f] for f in order], dim=1).requires_grad_()
        kt = KeyedTensor(order, [pooled[f].shape[1] for f in order], values)
        x = inputs(kt, dense)
        torch.testing.assert_close(x, want, rtol=0, atol=0, msg=str(order))
        x.backward(upstream)
        got = dict(zip(order, values.grad.split([pooled[f].shape[1] for f in order], dim=1)))
        for f in "abc":
            torch.testing.assert_close(got[f], want_grads[f], rtol=0, atol=0, msg=f"{order} {f}")


@pytest.mark.parametrize("cfg, device, want", [
    (dict(), "cuda", "reduce-overhead"), (dict(), "cpu", "off"),
    (dict(loss_balancing="gradnorm"), "cuda", "off"), (dict(compile="default"), "cpu", "default"),
    (dict(compile="off"), "cuda", "off"),
])
def test_compile_auto_means_cuda_graphs_on_a_gpu_only(cfg, device, want):
    assert compile_mode(ModelConfig(**cfg), device) == want


def test_compiled_step_is_one_graph_and_matches_eager(tmp_path):
    """model.compile: everything after the lookup compiles to one graph (no breaks: a break
    is another replay a step), with the same parameter names (plans and checkpoints carry
    over) and the same losses, predictions and gradients as the eager model."""
    columns = tiny_columns(tmp_path)
    batch = tiny_batch(columns, rows=64)
    tasks = {"click": TaskConfig(), "buy": TaskConfig(multiply_by="click")}
    eager = cpu_train_module(columns, tasks, CFG)
    compiled = cpu_train_module(columns, tasks, ModelConfig(**{**CFG.__dict__, "compile": "default"}))
    assert list(compiled.state_dict()) == list(eager.state_dict())
    assert eager.step.fn == eager.dense_step and compiled.step.fn != compiled.dense_step
    compiled.load_state_dict(eager.state_dict())
    torch._dynamo.reset()
    counters.clear()
    for module in (eager, compiled):
        loss, out = module(batch)
        loss.backward()
        module.out = out
    assert counters["stats"]["unique_graphs"] == 1 and not counters["graph_break"]
    torch.testing.assert_close(compiled.out.losses, eager.out.losses)
    torch.testing.assert_close(compiled.out.preds, eager.out.preds)
    grads = {k: p.grad for k, p in eager.named_parameters()}
    assert all(p.grad is not None for p in compiled.model.head.parameters())
    for k, p in compiled.named_parameters():
        torch.testing.assert_close(p.grad, grads[k], msg=k)


def loss_and_gradients(module, batch):
    """(loss, Outputs, every parameter's gradient) of one step of `module` on `batch`."""
    module.zero_grad()
    loss, out = module(batch)
    loss.backward()
    return loss.detach(), out, {n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("kinds", [("binary", "binary"), ("regression", "regression"), ("binary", "regression")])
def test_rows_of_weight_zero_change_neither_losses_nor_gradients(tmp_path, kinds):
    """Rows skipped as bad input (weight 0) carrying extreme labels and features: the same loss,
    per-task losses, gate statistics and gradients as the batch without them."""
    columns = tiny_columns(tmp_path)
    tasks = {"click": TaskConfig(type=kinds[0]), "buy": TaskConfig(type=kinds[1])}
    kept, extra = tiny_table(16, seed=0), tiny_table(8, seed=1)
    clean = arrow_to_batch(kept, columns, np.arange(16))
    mixed = arrow_to_batch(pa.concat_tables([kept, extra]), columns, np.arange(24))
    weights = torch.cat([torch.ones(16), torch.zeros(8)])
    labels = torch.cat([mixed.labels[:16], torch.full((8, 2), 1e4)])
    dense = torch.cat([mixed.dense[:16], torch.full((8, 2), -1e3)])
    mixed = dataclasses.replace(mixed, weights=weights, labels=labels, dense=dense, packed=None)
    module = cpu_train_module(columns, tasks, CFG)
    want_loss, want, want_grads = loss_and_gradients(module, clean)
    loss, got, grads = loss_and_gradients(module, mixed)
    torch.testing.assert_close(loss, want_loss)
    torch.testing.assert_close(got.losses, want.losses)
    torch.testing.assert_close(got.gates, want.gates)
    torch.testing.assert_close(got.preds[:16], want.preds)
    assert grads.keys() == want_grads.keys() and any("sparse" in n for n in grads)
    for name, g in grads.items():
        torch.testing.assert_close(g, want_grads[name], msg=name)


def test_task_weights_from_the_config_scale_their_towers_gradients(tmp_path):
    """tasks.<t>.weight as a loaded config gives it reaches the loss: weight 0 leaves click's
    tower without gradient, weight 2.5 gives buy's tower 2.5 times its unweighted gradient (the
    towers are one batched MLP: tower t is slice t of each weight)."""
    columns = tiny_columns(tmp_path)
    cfg = load_config(write(tmp_path, "[tasks.click]\nweight = 0.0\n[tasks.buy]\nweight = 2.5\n"))
    batch = tiny_batch(columns, rows=32)
    _, plain, plain_grads = loss_and_gradients(
        cpu_train_module(columns, {"click": TaskConfig(), "buy": TaskConfig()}, CFG), batch)
    loss, out, grads = loss_and_gradients(cpu_train_module(columns, cfg.tasks, CFG), batch)
    torch.testing.assert_close(out.losses, plain.losses)  # the per-task losses are unweighted
    torch.testing.assert_close(loss, 2.5 * out.losses[1])
    towers = [n for n in grads if n.startswith("model.towers.")]
    assert len(towers) == 4  # two layers' weights and biases
    for name in towers:
        assert plain_grads[name][0].abs().sum() > 0, name
        assert torch.equal(grads[name][0], torch.zeros_like(grads[name][0])), name
        torch.testing.assert_close(grads[name][1], 2.5 * plain_grads[name][1], msg=name)


def test_bf16_steps_close_to_fp32(tmp_path):
    """model.precision = "bf16": the head and towers compute in bfloat16 (the predictions differ
    from fp32's), while weights, predictions, losses and gradients stay float32 and within bf16's
    rounding of fp32's: predictions differed by 1.5e-3 at most, each gradient by under 1% of its
    norm (bf16 keeps 8 bits of mantissa, 0.4%), give or take 1e-4 for gradients that nearly cancel."""
    columns = tiny_columns(tmp_path)
    tasks = {"click": TaskConfig(), "buy": TaskConfig(type="regression")}
    batch = tiny_batch(columns, rows=64)
    fp32 = cpu_train_module(columns, tasks, CFG)
    bf16 = cpu_train_module(columns, tasks, dataclasses.replace(CFG, precision="bf16"))
    bf16.load_state_dict(fp32.state_dict())
    want_loss, want, want_grads = loss_and_gradients(fp32, batch)
    loss, got, grads = loss_and_gradients(bf16, batch)
    assert loss.dtype == got.preds.dtype == torch.float32 and not torch.equal(got.preds, want.preds)
    torch.testing.assert_close(got.preds, want.preds, rtol=0, atol=1e-2)
    torch.testing.assert_close(loss, want_loss, rtol=1e-2, atol=0)
    assert grads.keys() == want_grads.keys()
    for name, g in grads.items():
        assert g.dtype == torch.float32 and dict(bf16.named_parameters())[name].dtype == torch.float32, name
        assert (g - want_grads[name]).norm() < 0.03 * want_grads[name].norm() + 1e-4, name


# --- loss balancing -------------------------------------------------------------------------


def test_fixed_weights_multiply_the_losses():
    bal = LossBalancer("fixed", [1.0, 3.0], [True, True], 1.5, "cpu")
    assert bal(torch.tensor([2.0, 1.0])).item() == 5.0
    assert list(bal.parameters()) == []


def test_uncertainty_gives_a_noisier_task_a_smaller_weight():
    bal = LossBalancer("uncertainty", [1.0, 1.0, 1.0], [True, True, False], 1.5, "cpu")
    opt = torch.optim.Adam(bal.parameters(), lr=0.05)
    losses = torch.tensor([1.0, 10.0, 1.0])
    torch.testing.assert_close(bal.weights(), torch.tensor([1.0, 1.0, 0.5]))  # regression: 1 / 2
    for _ in range(300):
        opt.zero_grad()
        bal(losses).backward()
        opt.step()
    w = bal.weights()
    assert w[1] < w[0] / 5
    torch.testing.assert_close(w, 1 / (2 * losses), rtol=0.05, atol=0)  # the optimum: 1 / (2 L)


def gradnorm_problem(seed=0):
    """Two regression tasks on one shared linear layer; task 1's loss is 10x task 0's."""
    torch.manual_seed(seed)
    shared = torch.nn.Linear(6, 6)
    heads = torch.nn.Linear(6, 2)
    x = torch.randn(128, 6)
    y = torch.randn(128, 2) * torch.tensor([1.0, 10.0 ** 0.5])

    def losses():
        return ((heads(torch.relu(shared(x))) - y) ** 2).mean(0)
    return shared, heads, losses


def test_gradnorm_weights_sum_to_the_task_count_and_favour_the_weaker_gradient():
    shared, heads, losses = gradnorm_problem()
    bal = LossBalancer("gradnorm", [1.0, 3.0], [False, False], 1.5, "cpu")
    torch.testing.assert_close(bal.task_weights.detach().sum(), torch.tensor(2.0))  # 1:3 scaled to 2
    opt = torch.optim.Adam([*shared.parameters(), *heads.parameters(), *bal.parameters()], lr=0.01)
    for _ in range(60):
        opt.zero_grad()
        bal(losses(), shared.weight).backward()
        torch.testing.assert_close(bal.task_weights.detach().sum(), torch.tensor(2.0))  # renormalized
        opt.step()
    assert torch.isclose(bal.weights().sum(), torch.tensor(2.0))
    w = bal.weights()
    assert w[1] < 1.0 < w[0], f"the 10x-loss task should weigh less: {w}"
    assert (bal.initial > 0).all()


def test_gradnorm_keeps_its_objective_out_of_the_network():
    """The network's gradient is that of sum w_t L_t with w constant; w's comes from L_grad only."""
    shared, heads, losses = gradnorm_problem()
    bal = LossBalancer("gradnorm", [1.0, 1.0], [False, False], 1.5, "cpu")
    with torch.no_grad():
        bal.task_weights.copy_(torch.tensor([0.5, 1.5]))
    bal(losses(), shared.weight).backward()
    got = shared.weight.grad.clone()
    assert bal.task_weights.grad is not None and bal.task_weights.grad.abs().sum() > 0
    shared.weight.grad = None
    (torch.tensor([0.5, 1.5]) * losses()).sum().backward()
    torch.testing.assert_close(got, shared.weight.grad)


def test_gradnorm_in_eval_mode_needs_no_gradients():
    shared, _, losses = gradnorm_problem()
    bal = LossBalancer("gradnorm", [1.0, 1.0], [False, False], 1.5, "cpu").eval()
    with torch.no_grad():
        assert torch.isfinite(bal(losses(), shared.weight))
    assert (bal.initial == 0).all()


@pytest.mark.parametrize("mode", ["uncertainty", "gradnorm"])
def test_balanced_training_module_steps(tmp_path, mode):
    """MultiTaskTrain finds the head's shared weight and the balancer's parameters are trained."""
    columns = tiny_columns(tmp_path)
    tasks = {"click": TaskConfig(), "buy": TaskConfig(multiply_by="click")}
    module = cpu_train_module(columns, tasks, ModelConfig(**{**CFG.__dict__, "loss_balancing": mode}))
    names = [n for n, _ in module.named_parameters() if n.startswith("balancer.")]
    assert names == ["balancer.log_var" if mode == "uncertainty" else "balancer.task_weights"]
    opt = torch.optim.Adam([p for n, p in module.named_parameters() if "sparse" not in n], lr=0.01)
    before = module.balancer.weights().clone()
    for step in range(3):
        opt.zero_grad()
        loss, out = module(tiny_batch(columns, seed=step))
        loss.backward()
        opt.step()
        assert out.losses.shape == (2,) and torch.isfinite(loss)
    assert not torch.equal(module.balancer.weights(), before)


# --- config ---------------------------------------------------------------------------------


def write(tmp_path, text):
    path = tmp_path / "c.toml"
    path.write_text(text)
    return path


CHAIN = '[tasks.ctr]\n[tasks.ctcvr]\nmultiply_by = "ctr"\n'


def test_chain_and_balancing_config(tmp_path):
    cfg = load_config(write(tmp_path, CHAIN), ["--model.loss_balancing", "gradnorm", "--model.head", "ple"])
    assert cfg.tasks["ctcvr"].multiply_by == "ctr" and cfg.model.loss_balancing == "gradnorm"
    with pytest.raises(ConfigError, match=r"tasks.ctcvr.multiply_by is 'click', which is no task; tasks: ctr, ctcvr"):
        load_config(write(tmp_path, CHAIN), ["--tasks.ctcvr.multiply_by", "click"])
    with pytest.raises(ConfigError, match=r"makes a cycle: ctr -> ctcvr -> ctr"):
        load_config(write(tmp_path, CHAIN), ["--tasks.ctr.multiply_by", "ctcvr"])
    with pytest.raises(ConfigError, match=r"makes a cycle: ctr -> ctr"):
        load_config(write(tmp_path, CHAIN), ["--tasks.ctr.multiply_by", "ctr"])
    with pytest.raises(ConfigError, match=r"'ctr' is a regression task; a product of probabilities"):
        load_config(write(tmp_path, CHAIN), ["--tasks.ctr.type", "regression"])
    with pytest.raises(ConfigError, match=r"model.loss_balancing is 'pcgrad'; use one of fixed, uncertainty, gradnorm"):
        load_config(write(tmp_path, CHAIN), ["--model.loss_balancing", "pcgrad"])
    with pytest.raises(ConfigError, match=r"model.head is 'mmoe2'; use one of mmoe, omoe, shared_bottom, cgc, ple"):
        load_config(write(tmp_path, CHAIN), ["--model.head", "mmoe2"])
    with pytest.raises(ConfigError, match=r"model.num_shared_experts is 0; it must lie in \[1, inf\)"):
        load_config(write(tmp_path, CHAIN), ["--model.num_shared_experts", "0"])
    with pytest.raises(ConfigError, match=r"model.gradnorm_alpha is -1.0"):
        load_config(write(tmp_path, CHAIN), ["--model.gradnorm_alpha", "-1"])
    with pytest.raises(ConfigError, match=r"'gradnorm' balances several tasks"):
        load_config(write(tmp_path, "[tasks.ctr]\n"), ["--model.loss_balancing", "gradnorm"])
    with pytest.raises(ConfigError, match=r"tasks.ctr.weight is 0.0; model.loss_balancing 'uncertainty'"):
        load_config(write(tmp_path, CHAIN), ["--model.loss_balancing", "uncertainty", "--tasks.ctr.weight", "0"])


@pytest.mark.parametrize("name", ["census_omoe", "census_ple", "census_cgc", "census_shared_bottom",
                                  "synthetic_paper"])
def test_shipped_head_configs_load(name):
    cfg = load_config(f"configs/{name}.toml")
    expected = name.removeprefix("census_") if name.startswith("census_") else "mmoe"
    assert cfg.model.head == expected
