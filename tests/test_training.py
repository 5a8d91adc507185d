"""Training end to end: both stage scripts as users launch them, DDP equivalence, exact resume, loss masks."""
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from dataset.lm_dataset import GlobalBatchSampler, VLMDataset, collate_batch
from dataset.prepared import prepare_dataset
from dataset.processing import image_processor_for
from dataset.records import assistant_label_mask
from model.model_vlm import MiniMindVLM, VLMConfig
from trainer.config import STAGE_DEFAULTS, TRAINABLE_CHOICES, parse_stage_args
from trainer.setup import set_trainable
from trainer.training import lr_at

REPO_ROOT = Path(__file__).resolve().parents[1]
TINY_MODEL_FLAGS = ["--device", "cpu", "--hidden_size", "64", "--num_hidden_layers", "2", "--num_workers", "0"]


def stage_command(script, assets, out_dir, data_key, images_key, *extra, launcher=None):
    """The command line a user types, pointed at the tiny offline assets."""
    launcher = launcher or [sys.executable]
    return [*launcher, str(REPO_ROOT / script), *TINY_MODEL_FLAGS,
            "--data_path", str(assets["data"][data_key]), "--images_path", str(assets["data"][images_key]),
            "--vision_model_path", str(assets["clip"]), "--tokenizer_path", str(assets["tokenizer"]),
            "--save_dir", str(out_dir / "out"), "--checkpoint_dir", str(out_dir / "ckpt"),
            "--log_interval", "1", *extra]


def run(command, **kwargs):
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=kwargs.pop("cwd", "/"),
                            **kwargs)
    assert result.returncode == 0, f"{command}\nSTDOUT:\n{result.stdout}\nSTDERR:\n{result.stderr}"
    return result


@pytest.fixture(scope="module")
def assets(tiny_tokenizer_dir, tiny_clip_dir, shapes_data):
    return {"tokenizer": tiny_tokenizer_dir, "clip": tiny_clip_dir, "data": shapes_data}


def load_resume_model(path):
    return torch.load(path, map_location="cpu", weights_only=False)["model"]


# ------------------------------------------------------------------------------------------- scripts, end to end

def test_pretrain_then_sft_as_users_run_them(assets, tmp_path):
    pretrain = run(stage_command("train_pretrain_vlm.py", assets, tmp_path, "pretrain_jsonl", "pretrain_images",
                                 "--from_weight", "none", "--max_steps", "3", "--batch_size", "2"))
    assert "epoch 1/4 step 3/4" in pretrain.stdout
    assert "samples/s" in pretrain.stdout and "tokens/s" in pretrain.stdout and "ETA" in pretrain.stdout
    weights = tmp_path / "out" / "pretrain_vlm_64.pth"
    state = torch.load(weights, weights_only=True)
    assert all(v.dtype == torch.float16 for v in state.values())
    assert not any(k.startswith("vision_encoder") for k in state)
    config = VLMConfig(hidden_size=64, num_hidden_layers=2, ve_hidden_size=64)  # the tiny CLIP is 64 wide
    MiniMindVLM(config, vision_model_path=None).load_state_dict(state, strict=True)
    assert (tmp_path / "ckpt" / "pretrain_vlm_64_resume.pth").is_file()

    # SFT starts from the pretrain output by default (out/pretrain_vlm_64.pth), here on the parquet data.
    sft = run(stage_command("train_sft_vlm.py", assets, tmp_path, "sft_parquet", "sft_images", "--max_steps", "2"))
    assert "pretrain_vlm_64.pth" in sft.stdout
    sft_state = torch.load(tmp_path / "out" / "sft_vlm_64.pth", weights_only=True)
    MiniMindVLM(config, vision_model_path=None).load_state_dict(sft_state, strict=True)
    assert not torch.equal(sft_state["model.layers.0.mlp.up_proj.weight"], state["model.layers.0.mlp.up_proj.weight"])


def test_multi_image_sft_trains(assets, tmp_path):
    result = run(stage_command("train_sft_vlm.py", assets, tmp_path, "sft_multi_jsonl", "sft_multi_images",
                               "--from_weight", "none", "--max_steps", "2", "--batch_size", "2"))
    assert "done: 2 optimizer steps" in result.stdout


def test_missing_start_weights_is_one_line_error(assets, tmp_path):
    result = subprocess.run(stage_command("train_pretrain_vlm.py", assets, tmp_path, "pretrain_jsonl",
                                          "pretrain_images"), capture_output=True, text=True, timeout=300)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert "llm_64.pth not found" in result.stderr and "scripts.download" in result.stderr


def test_both_stage_parsers_have_the_same_flags_and_upstream_defaults():

    pre = parse_stage_args("pretrain", [])
    sft = parse_stage_args("sft", [])
    assert vars(pre).keys() == vars(sft).keys()
    assert (pre.epochs, pre.batch_size, pre.learning_rate, pre.max_seq_len, pre.from_weight) == (4, 16, 4e-4, 640, "llm")
    assert (sft.epochs, sft.batch_size, sft.learning_rate, sft.max_seq_len, sft.from_weight) == \
        (2, 4, 1e-6, 1536, "pretrain_vlm")
    differing = {k for k in vars(pre) if vars(pre)[k] != vars(sft)[k]}
    assert differing == set(STAGE_DEFAULTS["pretrain"]) - {"log_interval", "save_interval"} | {"trainable"}
    assert pre.save_dir.endswith("out") and pre.trainable == "projector_last_layer" and sft.trainable == "all"


def test_trainable_parameter_counts_at_26m():
    model = MiniMindVLM(VLMConfig(), vision_model_path=None)
    counts = {}
    for policy in TRAINABLE_CHOICES:
        set_trainable(model, policy)
        counts[policy] = sum(p.numel() for p in {id(p): p for p in model.parameters() if p.requires_grad}.values())
    # projector_first_last_layers (upstream 3v's --freeze_llm 1): the projector and two of the 2,819,072-parameter
    # blocks. lora (last: it changes the model): rank-8 adapters on q, k, v, o, gate, up, down of 8 layers (k and v
    # are 128 wide: 2 KV heads; the MLP 1408), and the projector.
    lora_per_layer = 8 * ((512 + 512) * 2 + (512 + 128) * 2 + (512 + 1408) * 3)
    assert counts == {"projector": 393_728, "projector_last_layer": 3_212_800,
                      "projector_first_last_layers": 393_728 + 2 * 2_819_072, "all": 26_223_616,
                      "lora": 393_728 + 8 * lora_per_layer}


def test_learning_rate_schedule_matches_upstream_formula():
    base = 4e-4
    for step, total in [(0, 100), (37, 100), (100, 100)]:
        expected = base * (0.1 + 0.45 * (1 + np.cos(np.pi * step / total)))
        assert lr_at(step, total, base) == pytest.approx(expected, rel=1e-12)


# --------------------------------------------------------------------------------------- DDP and exact resume

def test_two_process_ddp_equals_one_process_with_double_batch(assets, tmp_path):
    if not shutil.which("torchrun") and not (Path(sys.executable).parent / "torchrun").exists():
        pytest.skip("torchrun not installed")
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    common = ("--from_weight", "none", "--max_steps", "3", "--trainable", "all", "--learning_rate", "1e-3")
    ddp_dir, single_dir = tmp_path / "ddp", tmp_path / "single"
    # tests/ddp_probe.py: train_sft_vlm.py counting DDP's buffer broadcasts; the RoPE tables are constant, so
    # none after construction (broadcast_buffers=False), and no unused-parameter search either.
    ddp = run(stage_command("tests/ddp_probe.py", assets, ddp_dir, "sft_jsonl", "sft_images", *common,
                            "--batch_size", "2", launcher=torchrun),
              env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO_ROOT)})
    assert ddp.stdout.count("done: 3 optimizer steps") == 1  # rank 0 alone reports
    for rank in range(2):
        assert f"rank {rank}: 0 buffer broadcasts after DDP construction" in ddp.stdout, ddp.stdout
    assert "find_unused_parameters" not in ddp.stderr
    single = run(stage_command("train_sft_vlm.py", assets, single_dir, "sft_jsonl", "sft_images", *common,
                               "--batch_size", "4"))
    losses = [line.split("loss ")[1].split()[0] for line in single.stdout.splitlines() if "| loss " in line]
    assert len(set(losses)) == 3  # the weights really moved between steps
    ddp_losses = [line.split("loss ")[1].split()[0] for line in ddp.stdout.splitlines() if "| loss " in line]
    assert ddp_losses == losses  # the logged loss is the global-batch mean in both
    ddp_state = load_resume_model(ddp_dir / "ckpt" / "sft_vlm_64_resume.pth")
    single_state = load_resume_model(single_dir / "ckpt" / "sft_vlm_64_resume.pth")
    assert ddp_state.keys() == single_state.keys()
    for key, value in single_state.items():
        assert torch.allclose(ddp_state[key], value, atol=1e-5), key


def logged_losses(stdout):
    return [line.split("loss ")[1].split()[0] for line in stdout.splitlines() if "| loss " in line]


def free_port():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_two_node_launch_on_one_machine_equals_one_process_on_parquet(assets, tmp_path):
    """Two torchrun launchers (--nnodes 2, one process each), torchrun --standalone with 2 processes, and one
    process with the global batch: the same losses and weights, all on the parquet data (prepared once)."""
    common = ("--from_weight", "none", "--max_steps", "3", "--trainable", "all", "--learning_rate", "1e-3")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo"}
    single = run(stage_command("train_sft_vlm.py", assets, tmp_path / "single", "sft_parquet", "sft_images", *common,
                               "--batch_size", "4"))
    torchrun = [sys.executable, "-m", "torch.distributed.run"]
    port = free_port()
    nodes = [subprocess.Popen(stage_command(
        "train_sft_vlm.py", assets, tmp_path / "nodes", "sft_parquet", "sft_images", *common, "--batch_size", "2",
        launcher=[*torchrun, "--nnodes", "2", "--node_rank", str(rank), "--nproc_per_node", "1",
                  "--master_addr", "127.0.0.1", "--master_port", str(port)]),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd="/") for rank in range(2)]
    outputs = [node.communicate(timeout=600) for node in nodes]
    for node, (out, err) in zip(nodes, outputs):
        assert node.returncode == 0, f"STDOUT:\n{out}\nSTDERR:\n{err}"
    standalone = run(stage_command("train_sft_vlm.py", assets, tmp_path / "standalone", "sft_parquet", "sft_images",
                                   *common, "--batch_size", "2",
                                   launcher=[*torchrun, "--standalone", "--nproc_per_node", "2"]), env=env)
    losses = logged_losses(single.stdout)
    assert len(set(losses)) == 3
    assert logged_losses(outputs[0][0]) == losses and logged_losses(standalone.stdout) == losses
    assert not logged_losses(outputs[1][0])  # global rank 1 (node 1) does not log
    reference = load_resume_model(tmp_path / "single" / "ckpt" / "sft_vlm_64_resume.pth")
    for launched in ("nodes", "standalone"):
        state = load_resume_model(tmp_path / launched / "ckpt" / "sft_vlm_64_resume.pth")
        assert state.keys() == reference.keys()
        for key, value in reference.items():
            assert torch.allclose(state[key], value, atol=1e-5), (launched, key)


@pytest.mark.parametrize("data_key", ["sft_jsonl", "sft_parquet"])
def test_interrupted_and_resumed_run_is_bitwise_identical(assets, tmp_path, data_key):
    common = ("--from_weight", "none", "--trainable", "all", "--batch_size", "3", "--learning_rate", "1e-3")
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    run(stage_command("train_sft_vlm.py", assets, straight, data_key, "sft_images", *common, "--max_steps", "6"))
    run(stage_command("train_sft_vlm.py", assets, resumed, data_key, "sft_images", *common, "--max_steps", "4"))
    second = run(stage_command("train_sft_vlm.py", assets, resumed, data_key, "sft_images", *common,
                               "--max_steps", "6", "--from_resume", "1"))
    assert "resumed from" in second.stdout and "4 optimizer steps done" in second.stdout
    a = load_resume_model(straight / "ckpt" / "sft_vlm_64_resume.pth")
    b = load_resume_model(resumed / "ckpt" / "sft_vlm_64_resume.pth")
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert (straight / "out" / "sft_vlm_64.pth").read_bytes() == (resumed / "out" / "sft_vlm_64.pth").read_bytes()


# ---------------------------------------------------------------------------------------- batching and masks

def test_global_batches_are_the_same_for_any_world_size():
    lengths = np.random.default_rng(0).integers(200, 400, size=37)
    one = GlobalBatchSampler(lengths, batch_size=8, world_size=1, rank=0, seed=3)
    two = [GlobalBatchSampler(lengths, batch_size=4, world_size=2, rank=r, seed=3) for r in range(2)]
    for epoch in range(2):
        one.set_epoch(epoch)
        for sampler in two:
            sampler.set_epoch(epoch)
        single = list(one)
        pairs = list(zip(*two))
        assert len(single) == len(pairs) == one.steps_per_epoch()
        for whole, (r0, r1) in zip(single, pairs):
            assert whole == r0 + r1
        seen = sorted(i for batch in single for i in batch)
        assert seen == list(range(37))  # every sample once per epoch (the last batch is partial)
    one.set_epoch(0, start_step=2)
    assert list(one) == single_epoch0_from(lengths, 2)


def single_epoch0_from(lengths, start):
    sampler = GlobalBatchSampler(lengths, batch_size=8, world_size=1, rank=0, seed=3)
    sampler.set_epoch(0)
    return list(sampler)[start:]


def test_length_grouping_reduces_padding():
    lengths = np.random.default_rng(1).integers(210, 900, size=2000)

    def padding_fraction(group):
        sampler = GlobalBatchSampler(lengths, batch_size=16, seed=0, group_by_length=group)
        padded = sum(len(b) * lengths[b].max() for b in sampler)
        return 1 - lengths.sum() / padded

    assert padding_fraction(True) < 0.05 < padding_fraction(False)


def test_loss_masks_on_the_real_chat_template(real_tokenizer_dir, tmp_path):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(real_tokenizer_dir)
    images = tmp_path / "images"
    images.mkdir()
    from PIL import Image
    for name in ("a.jpg", "b.jpg"):
        Image.new("RGB", (32, 32), "red").save(images / name)
    records = [
        {"conversations": [{"role": "user", "content": "Describe.\n<image>"},
                           {"role": "assistant", "content": "A red square."}], "image": "a.jpg"},
        {"conversations": [{"role": "user", "content": "<image>\n<image>\nSame colour?"},
                           {"role": "assistant", "content": "Yes."},
                           {"role": "user", "content": "Sure?"},
                           {"role": "assistant", "content": "Quite sure."}], "image": "a.jpg, b.jpg"},
    ]
    data = tmp_path / "data.jsonl"
    import json
    data.write_text("\n".join(json.dumps(r) for r in records) + "\n")
    config = VLMConfig()
    prepared = prepare_dataset(data, tokenizer, config.image_special_token, 34, 1536, images_path=images, log=None)
    dataset = VLMDataset(prepared, image_processor_for(config), log=None)
    for index, answers in [(0, ["A red square."]), (1, ["Yes.", "Quite sure."])]:
        item = dataset[index]
        ids, labels = item["input_ids"], item["labels"]
        supervised = labels != -100
        assert torch.equal(labels[supervised], ids[supervised])
        # spans: each answer + <|im_end|> + '\n', nothing else
        expected = "".join(f"{a}<|im_end|>\n" for a in answers)
        assert tokenizer.decode(ids[supervised]) == expected
        assert int((ids == 34).sum()) == 196 * len(records[index]["image"].split(","))
        assert item["pixel_values"].shape == (len(records[index]["image"].split(",")), 3, 224, 224)
    batch = collate_batch([dataset[0], dataset[1]], pad_token_id=0)
    assert batch["pixel_values"].shape == (3, 3, 224, 224)  # flat, reading order
    assert batch["input_ids"].shape[1] == max(len(dataset.token_ids(0)), len(dataset.token_ids(1)))


def test_truncation_never_cuts_an_image(tiny_tokenizer_dir, shapes_data):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    config = VLMConfig()

    def prepare(max_seq_len):
        return prepare_dataset(shapes_data["pretrain_jsonl"], tokenizer, config.image_special_token, 34, max_seq_len,
                               images_path=shapes_data["pretrain_images"], log=None)

    # Pretrain records all carry an image (the SFT file also has text-only rows, which no limit here cuts).
    full = prepare(2048)
    full_stats = full.check(skip_bad_samples=False, log=None)
    shortest = int(full.lengths.min())
    # Cut inside every image run: all samples are left out and counted, none trained without its image.
    with pytest.raises(Exception, match="no usable sample"):
        prepare(100).check(skip_bad_samples=False, log=None)
    # A limit that keeps the images but cuts some answers entirely drops exactly those samples.
    limit = shortest - 3
    prepared = prepare(limit)
    stats = prepared.check(skip_bad_samples=True, log=None)
    partial = VLMDataset(prepared, image_processor_for(config), log=None)
    assert stats.usable + stats.answer_cut_by_max_seq_len + stats.image_cut_by_max_seq_len == full_stats.usable
    for index in range(len(partial)):
        ids = partial.token_ids(index)
        assert len(ids) <= limit
        assert assistant_label_mask(ids, partial.label_start_ids, partial.label_end_ids).any()


# ------------------------------------------------------------------- what a training step sends and waits for

# Operators that read a tensor's values on the host: on a GPU each waits for the device (a device->host sync).
HOST_READS = {"_local_scalar_dense", "nonzero", "masked_select", "masked_scatter", "is_nonzero", "equal", "item"}


class RecordedOps:
    """The aten operators run inside the `with` block (torch's dispatch mode)."""

    def __enter__(self):
        from torch.utils._python_dispatch import TorchDispatchMode

        names = self.names = []

        class Record(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                names.append(func.overloadpacket.__name__)
                return func(*args, **(kwargs or {}))

        self.mode = Record()
        self.mode.__enter__()
        return self

    def __exit__(self, *exc):
        self.mode.__exit__(*exc)

    @property
    def host_reads(self):
        return [name for name in self.names if name in HOST_READS]


@pytest.fixture(scope="module")
def sft_dataset(assets, tmp_path_factory):
    from transformers import AutoTokenizer

    torch.manual_seed(0)
    model = MiniMindVLM(VLMConfig(hidden_size=64, num_hidden_layers=2), vision_model_path=assets["clip"])
    config = model.config
    prepared = prepare_dataset(assets["data"]["sft_jsonl"], AutoTokenizer.from_pretrained(assets["tokenizer"]),
                               config.image_special_token, config.image_ids[0], 512,
                               images_path=assets["data"]["sft_images"], cache_dir=tmp_path_factory.mktemp("prepared"),
                               log=None)
    dataset = VLMDataset(prepared, image_processor_for(config), log=None)
    return dataset, model


@pytest.fixture(scope="module")
def sft_dataset_3v(shapes_data, tiny_siglip_dir, tiny_minimind3_tokenizer_dir, tmp_path_factory):
    """The SFT file as the minimind-3v preset reads it (MiniMind-3 LM and template, SigLIP pixels, 64 tokens)."""
    from transformers import AutoTokenizer

    from model.presets import vlm_config

    torch.manual_seed(0)
    model = MiniMindVLM(vlm_config("minimind-3v", 64, 2), vision_model_path=tiny_siglip_dir)
    config = model.config
    prepared = prepare_dataset(shapes_data["sft_jsonl"], AutoTokenizer.from_pretrained(tiny_minimind3_tokenizer_dir),
                               config.image_special_token, config.image_ids[0], 512,
                               images_path=shapes_data["sft_images"], cache_dir=tmp_path_factory.mktemp("prepared_3v"),
                               log=None, chat_format=config.chat_format)
    return VLMDataset(prepared, image_processor_for(config), log=None), model


def training_batch(dataset, indices):
    from trainer.training import move_batch

    items = [dataset[i] for i in indices]
    batch = collate_batch(items, dataset.pad_token_id, None, dataset.image_token_id, dataset.image_tokens_per_image)
    return move_batch(batch, torch.device("cpu"), dataset.image_processor)


def test_pixels_travel_as_uint8_and_arrive_as_clips_own_processor_gives_them(assets, sft_dataset):
    """Loader workers hand uint8 pixels over (150 KB an image, not 602 KB); what the training step receives after
    move_batch equals transformers' CLIP image processor of the encoder folder on the same file."""
    from PIL import Image

    from model.compat import pil_clip_image_processor_class

    dataset, _ = sft_dataset
    index = next(i for i in range(len(dataset)) if dataset.records[i].images)
    pixels = dataset[index]["pixel_values"]
    assert pixels.dtype == torch.uint8 and pixels.shape == (1, 3, 224, 224)
    clip = pil_clip_image_processor_class().from_pretrained(assets["clip"])
    with Image.open(dataset.records[index].images[0]) as image:
        expected = clip(images=image.convert("RGB"), return_tensors="pt")["pixel_values"]
    arrived = training_batch(dataset, [index])["pixel_values"]
    assert arrived.dtype == torch.float32 and arrived.shape == expected.shape
    assert (arrived - expected).abs().max() <= 1e-5


@pytest.mark.parametrize("dataset_fixture", ["sft_dataset", "sft_dataset_3v"])
def test_compiled_training_forward_on_collated_batches_gives_eager_losses_without_recompiling(dataset_fixture,
                                                                                              request):
    """The trainer's torch.compile on what the collator hands over (image positions, and the first target as a
    Python int): a bounded set of graphs, not one per length. Dynamo specialises sizes 0 and 1 and gives equal
    sizes one symbol, so the image count M has a graph for M == batch size (one image a row), for M == 0
    (text-only), for M == 1 and for any other M; after those, new lengths, first targets and image counts compile
    nothing more, and the losses equal eager ones. aot_eager: graph breaks and recompiles are dynamo's, decided
    before the backend."""
    from torch._dynamo.utils import counters

    from trainer.setup import compile_model

    dataset, model = request.getfixturevalue(dataset_fixture)
    with_images = [i for i in range(len(dataset)) if dataset.records[i].images]
    text_only = [i for i in range(len(dataset)) if not dataset.records[i].images]
    first = (with_images[0:3], text_only[0:3], with_images[3:5] + text_only[3:4], with_images[5:6] + text_only[4:6])
    later = (with_images[6:9], text_only[6:9], with_images[9:11] + text_only[9:10], with_images[11:14])
    batches = [training_batch(dataset, indices) for indices in first + later]  # the loader's fixed size 3
    assert [len(b["pixel_values"]) for b in batches] == [3, 0, 2, 1, 3, 0, 2, 3]
    shapes = [(b["input_ids"].shape[1], b["first_target"]) for b in batches]
    assert len(set(shapes[len(first):])) == len(later)  # every later batch a new (length, first target)
    torch._dynamo.reset()
    counters.clear()
    compiled = compile_model(model, backend="aot_eager")
    for number, batch in enumerate(batches):
        inputs = {key: batch[key] for key in ("input_ids", "labels", "pixel_values", "image_positions",
                                              "first_target", "target_index")}
        got = compiled(**inputs, loss_only=True).loss
        got.backward()
        want = model(**inputs, loss_only=True).loss
        assert torch.allclose(got.detach(), want.detach(), atol=1e-5), number
        if number == len(first) - 1:
            graphs = counters["stats"]["unique_graphs"]
    assert counters["stats"]["unique_graphs"] == graphs
    model.zero_grad(set_to_none=True)
    torch._dynamo.reset()


def test_inductor_options_are_settings_of_the_installed_torch():
    """compile_model's inductor options: each one a setting this torch has (inductor refuses an unknown one at the
    first compiled step), Triton's coalescing analysis off where it exists (it failed torch 2.11's CUDA compile)."""
    import torch._inductor.config as inductor_config

    from trainer.setup import inductor_options

    options = inductor_options()
    with inductor_config.patch(options):
        if hasattr(inductor_config.triton, "coalesce_tiling_analysis"):
            assert options == {"triton.coalesce_tiling_analysis": False}
            assert inductor_config.triton.coalesce_tiling_analysis is False


def test_collated_positions_make_the_training_forward_free_of_host_reads(sft_dataset):
    dataset, model = sft_dataset
    batch = training_batch(dataset, range(4))
    assert batch["pixel_values"] is not None and len(batch["image_positions"]) == 196 * len(batch["pixel_values"])
    with RecordedOps() as ops:
        out = model(input_ids=batch["input_ids"], labels=batch["labels"], pixel_values=batch["pixel_values"],
                    loss_only=True, image_positions=batch["image_positions"], first_target=batch["first_target"],
                    target_index=batch["target_index"])
        out.loss.backward()
    assert ops.host_reads == []
    # The same loss as the forward that finds the positions itself (which reads the device), and as upstream's
    # full-logits loss.
    with RecordedOps() as ops:
        found = model(input_ids=batch["input_ids"], labels=batch["labels"], pixel_values=batch["pixel_values"],
                      loss_only=True)
    assert ops.host_reads
    full = model(input_ids=batch["input_ids"], labels=batch["labels"], pixel_values=batch["pixel_values"])
    assert torch.equal(out.loss, found.loss) and torch.allclose(out.loss, full.loss, atol=1e-5)


def test_a_text_only_batch_still_trains_through_the_projector(sft_dataset):
    dataset, model = sft_dataset
    text_only = [i for i in range(len(dataset)) if not dataset.records[i].images][:2]
    batch = training_batch(dataset, text_only)
    assert batch["pixel_values"].shape == (0, 3, 224, 224) and len(batch["image_positions"]) == 0
    model.zero_grad(set_to_none=True)
    out = model(input_ids=batch["input_ids"], labels=batch["labels"], pixel_values=batch["pixel_values"],
                loss_only=True, image_positions=batch["image_positions"], first_target=batch["first_target"],
                target_index=batch["target_index"])
    out.loss.backward()
    # DDP without find_unused_parameters needs every trainable parameter's gradient on every rank and step.
    for parameter in model.vision_proj.parameters():
        assert parameter.grad is not None and not parameter.grad.any()
    assert all(p.grad is not None for p in model.parameters())
