#!/usr/bin/env python3
"""Hostile and careless input through the real binary, one table row per case (issue 13).

Every row is a command that must fail as a user error: exit code 2, nothing on stdout, exactly
one line on stderr of the form `error: <file or knob>: <field>: <what was expected>` that matches
the row's pattern, within a time limit (no hang) and a memory limit (no unbounded growth), and
leaving no file behind in the folder the command may write to. The inputs are written here, from
the committed examples, by the small generators below.

Run by ctest:  python3 tests/cli_hostile.py <mst-plan binary> <source dir>
"""
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

TIME_LIMIT_S = 60        # a sanitizer build is several times slower; a hang is stopped here
MEMORY_LIMIT_KIB = 3 << 20  # 3 GiB: the CUDA runtime's mappings are counted; unbounded growth is not
ONE_LINE = re.compile(r"^error: [^\n]+?: [^\n]+?: [^\n]+\n\Z")

BINARY, SOURCE = Path(sys.argv[1]).resolve(), Path(sys.argv[2]).resolve()
WORK = Path(tempfile.mkdtemp(prefix="mst-plan-hostile-"))
IN, OUT = WORK / "in", WORK / "out"
IN.mkdir()
OUT.mkdir()


# ---- inputs --------------------------------------------------------------------------------------

def write(name, text):
    path = IN / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    return str(path)


def write_json(name, obj):
    return write(name, json.dumps(obj))


def load(relative):
    return json.loads((SOURCE / relative).read_text())


TINY = load("models/tiny-llama.json")
PROFILE = load("profiles/h100-sxm-80gb.json")
PLAN = load("tests/golden/plan_llama3_8b.json")
MEASURED = load("results/cpu/tiny-default/measured.json")
TORCH = load("tests/data/torch_measure_tiny.json")


def changed(obj, path, value):
    """A deep copy of `obj` with the field at `path` (keys and indices) set to `value` (None: removed)."""
    out = json.loads(json.dumps(obj))
    node = out
    for key in path[:-1]:
        node = node[key]
    if value is None:
        del node[path[-1]]
    else:
        node[path[-1]] = value
    return out


def deep(levels, inner="0"):
    return "[" * levels + inner + "]" * levels


def measured_event(index, column, value):
    """The measurement with one column of one timeline event replaced (alloc and its free alike for bytes)."""
    out = changed(MEASURED, ["timeline", "events", index, column], value)
    if column == 2:  # keep the timeline consistent: the free of that tensor frees the same bytes
        tensor = out["timeline"]["events"][index][1]
        for e in out["timeline"]["events"]:
            if e[0] == "free" and e[1] == tensor:
                e[2] = value
    return out


os.mkfifo(IN / "fifo.json")
(IN / "folder.json").mkdir()
setup_file = write_json("setup.json", {"seq_len": 256})
tiny_file = write_json("tiny.json", TINY)
plan_file = write_json("plan.json", PLAN)
measured_file = write_json("measured.json", MEASURED)
write_json("models/tiny-llama.json", TINY)  # a measurement's config is looked up beside it
# A measurement the simulator no longer agrees with (one tensor twice as large): report --check fails.
largest = max(range(len(MEASURED["timeline"]["events"])), key=lambda i: MEASURED["timeline"]["events"][i][2])
big = measured_event(largest, 2, MEASURED["timeline"]["events"][largest][2] * 4)
write_json("off/measured.json", big)
shutil.copy(IN / "tiny.json", IN / "off" / "tiny-llama.json")
# A folder whose good measurement stands beside a mislabelled one and one cut short: --check vouches for neither.
write_json("mislabelled/good.json", MEASURED)
write_json("mislabelled/odd.json", changed(MEASURED, ["format"], "mst-measure/1 "))
write("cut/m.json", json.dumps(MEASURED)[:1000])
write_json("cut/good.json", MEASURED)
for folder in ("mislabelled", "cut"):
    shutil.copy(IN / "tiny.json", IN / folder / "tiny-llama.json")

# ---- the table -----------------------------------------------------------------------------------
# (name, arguments, pattern the error line must match after "error: "). Paths under OUT are the
# outputs a case may try to write; the folder must hold exactly what it held before the case.
E = "estimate --model tiny-llama".split()
R = "recommend --model tiny-llama".split()
M = "measure --backend cpu --model tiny-llama --seq 16".split()
o = lambda name: str(OUT / name)  # noqa: E731
CASES = [
    # 1. crashes: deep JSON wherever a file is read, division by zero in the tuner
    ("deep model", ["show", write("deep_model.json", '{"hidden_size": ' + deep(100000) + "}")], r"deep_model.json: json: expected arrays and objects nested at most 64 deep"),
    ("deep setup", E + ["--setup", write("deep_setup.json", '{"seq_len": ' + deep(100000) + "}")], r"deep_setup.json: json: .*nested at most 64"),
    ("deep setup array", E + ["--setup", write("deep_array.json", deep(65))], r"deep_array.json: json: .*nested at most 64"),
    ("deep profile", E + ["--gpu", write("deep_gpu.json", '{"name": ' + deep(100000) + "}")], r"deep_gpu.json: json: "),
    ("deep plan", ["emit", "--plan", write("deep_plan.json", deep(100000)), "--format", "hf-mst"], r"deep_plan.json: json: "),
    ("deep measurement", ["compare", "--run", write("deep_measure.json", '{"format": "mst-measure/1", "setup": ' + deep(100000, "{}") + "}")], r"deep_measure.json: json: "),
    ("deep object nesting", ["show", write("deep_objects.json", '{"a":' * 70 + "1" + "}" * 70)], r"deep_objects.json: json: "),
    ("deep report file", ["report", write("deep_report/m.json", deep(100000))], r"report: measurements: expected at least one mst-measure/1 file under the given paths; 1 \*.json file left out: .*m.json \(json: expected arrays and objects nested at most 64 deep"),
    ("deep compare pair", ["compare", measured_file, write("deep_pair.json", deep(1000))], r"deep_pair.json: json: "),
    ("tokens per step overflow", R + ["--seq", "1", "--tokens-per-step", "4611686018427387904"], r"--tokens-per-step: '4611686018427387904': expected a decimal integer in \[1, "),
    ("tokens per step beyond the bounds", R + ["--seq", "1", "--tokens-per-step", "1099511627776"], r"recommend: tokens_per_step: expected \[1, [0-9]+\] tokens"),
    # 2. hangs and unbounded memory
    ("recommend on 2^63 GPUs", R + ["--gpus", "9223372036854775807"], r"--gpus: '9223372036854775807': expected a decimal integer in \[1, 65536\]"),
    ("max-seq on 2^63 GPUs", ["max-seq", "--model", "tiny-llama", "--gpus", "9223372036854775807"], r"--gpus: .*\[1, 65536\]"),
    ("recommend on 65537 GPUs", R + ["--gpus", "65537"], r"--gpus: '65537': "),
    ("recommend on -1 threads", R + ["--threads", "-1"], r"--threads: '-1': expected a decimal integer in \[0, 64\]"),
    ("max-seq on 2^63 threads", ["max-seq", "--model", "tiny-llama", "--threads", "9223372036854775807"], r"--threads: '9223372036854775807': expected a decimal integer in \[0, 64\]"),
    ("bench tuner on half a thread", ["bench", "tuner", "--threads", "0.5"], r"--threads: '0.5': expected a decimal integer in \[0, 64\]"),
    ("ten million chunks", E + ["--seq", "10000000", "--mlp-chunks", "10000000"], r"setup: mlp_chunks: expected an integer in \[1, 4096\], got 10000000"),
    ("ten million LM chunks", E + ["--seq", "10000000", "--lm-chunks", "10000000"], r"setup: lm_chunks: expected an integer in \[1, 4096\]"),
    ("one-token MLP chunks", E + ["--seq", "10000000", "--mlp-chunk-tokens", "1"], r"setup: mlp_chunks: expected an integer in \[1, 4096\], got 10000000"),
    ("16384 tiled chunks (a fuzz timeout: 44 s sanitised)", E + ["--seq", "1048576", "--mlp-chunks", "16384", "--lm-chunks", "16384", "--mlp-impl", "tiled", "--lm-impl", "fused"], r"setup: mlp_chunks: expected an integer in \[1, 4096\], got 16384"),
    ("chunks x layers", ["estimate", "--model", "llama-3.1-70b", "--seq", "1048576", "--mlp-chunks", "4096"], r"setup: mlp_chunks: expected at most 204 for 80 layers"),
    ("measurement at layer 2^31-2", ["compare", measured_file, write_json("layer_huge.json", measured_event(5, 6, 2147483646))], r"layer_huge.json: timeline: events\[5\].layer: expected an integer in \[-1, 1023\], got 2147483646"),
    ("measurement seq 5e7", ["compare", "--run", write_json("seq_5e7.json", changed(MEASURED, ["setup", "seq_len"], 5e9))], r"seq_5e7.json: setup: seq_len: expected an integer in \[1, 1073741824\], got 5000000000.0"),
    ("cpu measure of a 70B model", ["measure", "--backend", "cpu", "--model", "llama-3.1-70b", "--seq", "64"], r"measure: backend cpu: expected a step within the .* the simulator predicts [0-9]+ bytes"),
    ("cpu measure of 10^8 tokens", M[:-1] + ["100000000"], r"measure: backend cpu: expected a step within .* predicts [0-9]+ bytes"),
    ("FIFO as a model", ["show", str(IN / "fifo.json")], r"fifo.json: file: expected a regular JSON file, got a FIFO"),
    ("FIFO as a setup", E + ["--setup", str(IN / "fifo.json")], r"fifo.json: file: expected a regular JSON file"),
    ("FIFO as a plan", ["emit", "--plan", str(IN / "fifo.json"), "--format", "hf-mst"], r"fifo.json: file: expected a regular"),
    ("FIFO as a measurement", ["compare", "--run", str(IN / "fifo.json")], r"fifo.json: file: expected a regular"),
    ("FIFO as a profile", E + ["--gpu", str(IN / "fifo.json")], r"fifo.json: file: expected a regular"),
    ("/dev/zero as a model", ["show", "/dev/zero"], r"/dev/zero: file: expected a regular JSON file"),
    ("/dev/stdin as a setup", E + ["--setup", "/dev/stdin"], r"/dev/stdin: file: expected a regular"),
    # 3. exit 3 on user input
    ("1e309 in a model", ["show", write("huge_model.json", json.dumps(TINY)[:-1] + ', "rope_theta": 1e309}')], r"huge_model.json: json: expected valid JSON with numbers a double can hold, got number overflow"),
    ("1e309 in a setup", E + ["--setup", write("huge_setup.json", '{"seq_len": 1e309}')], r"huge_setup.json: json: expected valid JSON with numbers"),
    ("1e309 in a profile", E + ["--gpu", write("huge_gpu.json", '{"hbm_gbps": 1e309}')], r"huge_gpu.json: json: "),
    ("plan whose setup does not validate", ["emit", "--plan", write_json("offload_none.json", changed(changed(PLAN, ["setup", "checkpoint"], []), ["setup", "offload_checkpoints"], True)), "--format", "hf-mst"], r"offload_none.json: setup: offload_checkpoints: expected some checkpointed layers"),
    ("1e309 in a plan", ["emit", "--plan", write("huge_plan.json", '{"gpus": 1e309}'), "--format", "hf-mst"], r"huge_plan.json: json: "),
    ("1e309 in a measurement", ["compare", "--run", write("huge_measure.json", '{"workspace_bytes": -1e309}')], r"huge_measure.json: json: "),
    ("1e309 in a report", ["report", write("huge_report/m.json", '{"format": "mst-measure/1", "x": 1e309}')], r"report: measurements: expected at least one .*1 \*.json file left out: .*\(json: expected valid JSON with numbers a double can hold"),
    ("not UTF-8", ["show", write("latin1.json", b'{"model_type": "ll\xe9ma"}')], r"latin1.json: json: expected valid JSON, parse error at byte"),
    ("NUL bytes", ["show", write("nul.json", b'{"hidden_size": 64\x00}')], r"nul.json: json: expected valid JSON, parse error"),
    ("empty file", ["show", write("empty.json", "")], r"empty.json: json: expected valid JSON"),
    ("directory as a model", ["show", str(IN / "folder.json")], r"folder.json: file: expected a JSON file, got a directory"),
    ("directory as a setup", E + ["--setup", str(IN)], r"in: file: expected a JSON file, got a directory"),
    ("directory as a plan", ["emit", "--plan", str(IN), "--format", "hf-mst"], r"in: file: expected a JSON file, got a directory"),
    ("directory as a measurement", ["compare", "--run", str(IN)], r"in: file: expected a JSON file, got a directory"),
    ("directory as a profile", E + ["--gpu", str(IN / "folder.json")], r"folder.json: file: expected a JSON file, got a directory"),
    ("missing report path", ["report", str(IN / "nowhere")], r"nowhere: file: expected a measurement file or a folder"),
    ("report on a folder of junk", ["report", str(IN / "deep_report")], r"report: measurements: expected at least one"),
    # 4. silently wrong results
    ("eager attention past 2^63", ["estimate", "--model", "llama-3-8b", "--seq", "750000000", "--attention", "eager"], r"setup: tensor size: expected a value below 2\^63, got .*overflows 64 bits"),
    ("parameters past 2^63", ["show", write_json("huge_params.json", dict(TINY, hidden_size=1 << 20, intermediate_size=1 << 23, num_hidden_layers=1024, num_attention_heads=16384, num_key_value_heads=16384, head_dim=1 << 20))], r"huge_params.json: num_hidden_layers: expected a model whose parameters fit in 63 bits"),
    ("layers beyond the bound", ["show", write_json("layers.json", dict(TINY, num_hidden_layers=1025))], r"layers.json: num_hidden_layers: expected an integer in \[1, 1024\], got 1025"),
    ("octal seq", E + ["--seq", "0100"], r"--seq: '0100': expected a decimal integer"),
    ("hex seq", E + ["--seq", "0x100"], r"--seq: '0x100': expected a decimal integer"),
    ("plus-signed seq", E + ["--seq", "+100"], r"--seq: '\+100': expected a decimal integer"),
    ("seq with a space", E + ["--seq", " 100"], r"--seq: ' 100': expected a decimal integer"),
    ("seq with a unit", E + ["--seq", "100k"], r"--seq: '100k': expected a decimal integer"),
    ("fractional seq", E + ["--seq", "100.5"], r"--seq: '100.5': expected a decimal integer"),
    ("seq beyond int64", E + ["--seq", "99999999999999999999"], r"--seq: '99999999999999999999': expected a decimal integer"),
    ("seq below int64", E + ["--seq", "-99999999999999999999"], r"--seq: '-99999999999999999999': "),
    ("seq beyond the bound", E + ["--seq", "1073741825"], r"setup: seq_len: expected an integer in \[1, 1073741824\], got 1073741825"),
    ("negative seq", E + ["--seq", "-5"], r"setup: seq_len: expected a positive integer, got -5"),
    ("zero batch", E + ["--batch", "0"], r"setup: micro_batch: expected a positive integer, got 0"),
    ("batch x seq beyond the bound", E + ["--batch", "65536", "--seq", "131072"], r"setup: micro_batch: expected micro_batch x seq_len at most 4294967296 tokens"),
    ("grad-accum 2^31", E + ["--grad-accum", "2147483648"], r"setup: grad_accum: expected an integer in \[1, 1048576\], got 2147483648"),
    ("dp beyond the bound", E + ["--dp", "65537"], r"setup: dp: expected an integer in \[1, 65536\]"),
    ("dp x sp beyond the bound", ["estimate", "--model", "llama-3-8b", "--dp", "65536", "--sp", "2"], r"setup: dp: expected dp x sp at most 65536 GPUs"),
    ("ep zero", E + ["--ep", "0"], r"setup: ep: expected a positive integer|setup: ep: expected an integer in \[1, 65536\], got 0"),
    ("ep on a dense model", E + ["--runtime", "kernels", "--dp", "2", "--ep", "2"], r"setup: ep: expected 1 for a dense model"),
    ("ep beyond the experts' divisors", ["estimate", "--model", "qwen3-30b-a3b", "--runtime", "kernels", "--dp", "6", "--ep", "3"], r"setup: ep: expected a divisor of the experts \(128\), got 3"),
    ("moe imbalance nan", ["estimate", "--model", "qwen3-30b-a3b", "--runtime", "kernels", "--dp", "2", "--ep", "2", "--moe-imbalance", "nan"], r"--moe-imbalance: 'nan': expected a finite number"),
    ("moe imbalance past ep", ["estimate", "--model", "qwen3-30b-a3b", "--runtime", "kernels", "--dp", "2", "--ep", "2", "--moe-imbalance", "3"], r"setup: moe_imbalance: expected a number in \[1, ep = 2\]"),
    ("ep pin on a dense model", ["recommend", "--model", "tiny-llama", "--runtime", "kernels", "--gpus", "2", "--pin", "ep=2"], r"recommend: pin: ep=2: expected 1 for a dense model"),
    ("zero stage 4", E + ["--zero", "4"], r"setup: zero_stage: expected 0, 1, 2 or 3, got 4"),
    ("zero stage beyond int", E + ["--zero", "4294967296"], r"--zero: '4294967296': expected a decimal integer in \[-2147483648, 2147483647\]"),
    ("prefetch 9", E + ["--zero3-prefetch", "9"], r"setup: zero3_prefetch: expected 0..8 layers, got 9"),
    ("reduce bucket 0", E + ["--zero", "2", "--dp", "2", "--precision", "bf16-master", "--reduce-bucket-size", "0"], r"setup: reduce_bucket_size: expected an integer in \[1, 1099511627776\], got 0"),
    ("reduce bucket without DeepSpeed", E + ["--reduce-bucket-size", "4096"], r"setup: reduce_bucket_size: expected DeepSpeed's default 500000000 unless DeepSpeed's ZeRO engine runs the step"),
    ("persistence without ZeRO-3", E + ["--zero", "2", "--dp", "2", "--param-persistence-threshold", "0"], r"setup: param_persistence_threshold: expected DeepSpeed's default 100000 unless DeepSpeed's ZeRO-3 engine runs the step \(runtime hf, zero_stage 3\), got 0"),
    ("negative prefetch bucket", E + ["--zero", "3", "--dp", "2", "--prefetch-bucket-size", "-5"], r"--prefetch-bucket-size: '-5': expected a decimal integer in \[0, "),
    ("prefetch bucket past the limit", E + ["--zero", "3", "--dp", "2", "--precision", "bf16-master", "--prefetch-bucket-size", str(1 << 41)], r"setup: prefetch_bucket_size: expected an integer in \[0, 1099511627776\], got 2199023255552"),
    ("layers of prefetch with hf", E + ["--zero", "3", "--dp", "2", "--precision", "bf16-master", "--zero3-prefetch", "2"], r"setup: zero3_prefetch: expected 1 with runtime hf \(the kernels runtime's layers"),
    ("zero 3 rank past the ranks", E + ["--zero", "3", "--dp", "2", "--precision", "bf16-master", "--rank", "2"], r"setup: rank: expected a rank whose step differs"),
    ("zero 3 in hf on one GPU", E + ["--zero", "3", "--precision", "bf16-master"], r"setup: dp: expected 2 or more ranks with runtime hf and ZeRO-3"),
    ("zero 3 in hf for a Mixture-of-Experts model, tiled", ["estimate", "--model", "qwen3-30b-a3b", "--zero", "3", "--dp", "2", "--precision", "bf16-master", "--mlp-chunks", "2", "--mlp-impl", "tiled"], r"setup: mlp_impl: expected loop for qwen3-30b-a3b with runtime hf and ZeRO-3"),
    ("zero 3 in hf for MLP biases", ["estimate", "--model", str(SOURCE / "tests/data/tiny_llama_bias.json"), "--zero", "3", "--dp", "2", "--precision", "bf16-master", "--lm-chunks", "2", "--checkpoint", "all", "--offload"], r"setup: zero_stage: expected 0, 1 or 2 for tiny_llama_bias with runtime hf and ZeRO-3"),
    ("zero 3 in hf for gpt-oss, tiled", ["estimate", "--model", "gpt-oss-20b", "--zero", "3", "--dp", "2", "--precision", "bf16-master", "--mlp-chunks", "2", "--mlp-impl", "tiled"], r"setup: mlp_impl: expected loop for gpt-oss-20b with runtime hf and ZeRO-3"),
    ("reduce bucket for max-seq without DeepSpeed", ["max-seq", "--model", "tiny-llama", "--gpus", "8", "--reduce-bucket-size", "4096"], r"max-seq: reduce-bucket-size: expected --for deepspeed or axolotl with runtime hf, or your setup under DeepSpeed's ZeRO 1/2"),
    ("reduce bucket for recommend without DeepSpeed", R + ["--reduce-bucket-size", "4096"], r"recommend: reduce-bucket-size: expected --for deepspeed or axolotl with runtime hf"),
    ("reduce bucket with zero 0 pinned", R + ["--seq", "256", "--for", "axolotl", "--pin", "zero=0", "--reduce-bucket-size", "4096"], r"recommend: pin: zero=0: expected 1 or 2 with --reduce-bucket-size 4096"),
    ("reduce bucket past int64", E + ["--zero", "2", "--dp", "2", "--reduce-bucket-size", "9223372036854775808"], r"--reduce-bucket-size: '9223372036854775808': expected a decimal integer"),
    ("overlap_comm without DeepSpeed", E + ["--overlap-comm"], r"setup: overlap_comm: expected false unless DeepSpeed's ZeRO 1/2 engine runs the step"),
    ("overlap_comm with a value not a boolean", E + ["--zero", "2", "--dp", "2", "--overlap-comm=maybe"], r"--overlap-comm: 'maybe': expected true or false"),
    ("overlap_comm for max-seq without DeepSpeed", ["max-seq", "--model", "tiny-llama", "--gpus", "8", "--overlap-comm"], r"max-seq: overlap-comm: expected --for deepspeed or axolotl with runtime hf, or your setup under DeepSpeed's ZeRO 1/2"),
    ("overlap_comm pinned without DeepSpeed", R + ["--gpus", "2", "--pin", "overlap_comm=yes"], r"--pin: overlap_comm: yes: expected --for deepspeed or axolotl with runtime hf"),
    ("overlap_comm pinned to maybe", R + ["--pin", "overlap_comm=maybe"], r"--pin: overlap_comm: expected yes or no"),
    ("overlap_comm pinned with zero 0", R + ["--seq", "256", "--for", "axolotl", "--pin", "zero=0", "--pin", "overlap_comm=yes"], r"recommend: pin: zero=0: expected 1 or 2 with overlap_comm=yes"),
    # DeepSpeed's ZeRO 1/2 in the hf runtime: its ranks, its precision, its bound
    ("deepspeed rank past dp", E + ["--zero", "2", "--dp", "3", "--precision", "bf16-master", "--rank", "3"], r"setup: rank: expected a rank whose step differs"),
    ("deepspeed rank negative", E + ["--zero", "2", "--dp", "3", "--precision", "bf16-master", "--rank", "-1"], r"setup: rank: expected a rank whose step differs"),
    ("rank with ZeRO 0", E + ["--dp", "2", "--rank", "0"], r"setup: rank: expected a rank whose step differs"),
    ("deepspeed amp", E + ["--zero", "2", "--dp", "2", "--precision", "amp"], r"setup: precision: expected bf16-master or pure-bf16 with runtime hf and ZeRO 1 or 2"),
    ("deepspeed past its walked ranks", E + ["--zero", "1", "--dp", "129", "--precision", "bf16-master"], r"setup: dp: expected at most 128 ranks with runtime hf and ZeRO 1 or 2"),
    ("recommend deepspeed past its walked ranks", R + ["--gpus", "129", "--for", "deepspeed"], r"recommend: gpus: expected at most 128 with runtime hf and --for deepspeed"),
    ("recommend axolotl zero 1 pin with sgd", R + ["--for", "axolotl", "--pin", "zero=1", "--optimizer", "sgd"], r"setup: optimizer: expected adamw with optimizer_impl fused with runtime hf and ZeRO 1 or 2 \(DeepSpeed's engine\)"),
    ("recommend deepspeed zero 3 pin", R + ["--gpus", "8", "--for", "deepspeed", "--pin", "zero=3"], r"setup: precision: expected bf16-master with runtime hf and ZeRO-3 \(DeepSpeed's stage-3 engine\)"),
    ("recommend hf-mst zero 3 pin with a chunked LM head pin for a soft-capping model", ["recommend", "--model", "gemma-2-2b", "--gpus", "8", "--runtime", "kernels", "--for", "hf-mst", "--pin", "zero=3", "--pin", "M_lm=4"], r"recommend: for: a setup hf-mst can train as planned; none of those searched is: hf-mst: setup.lm_chunks: expected 1 with zero_stage 3 for gemma-2-2b"),
    ("recommend deepspeed zero 3 pin for mixtral on 8 GPUs", ["recommend", "--model", "mixtral-8x7b", "--gpus", "8", "--for", "deepspeed", "--precision", "bf16-master", "--pin", "zero=3"], r"mixtral-8x7b: no setup fits: expected one for 8192 tokens on 8 x h100-sxm-80gb within 75.81 GiB: weights, gradients, optimizer states and cuBLAS's workspace alone take 96.93 GiB per GPU"),
    ("zero chunk tokens", E + ["--mlp-chunk-tokens", "0"], r"command line: mlp-chunk-tokens: expected a positive token count, got 0"),
    ("chunks and chunk tokens", E + ["--lm-chunks", "2", "--lm-chunk-tokens", "8"], r"command line: lm-chunk-tokens: expected --lm-chunks or --lm-chunk-tokens, not both"),
    ("flag given a word", E + ["--padded=maybe"], r"--padded: 'maybe': expected true or false"),
    ("offload flag given a number word", E + ["--offload=sometimes"], r"--offload: 'sometimes': expected true or false"),
    ("flag given a negative number", E + ["--padded=-1"], r"--padded: '-1': expected true or false"),
    ("fsdp2 groups of an unknown trainer", E + ["--dp", "2", "--zero", "3", "--fsdp2", "--fsdp2-groups", "deepspeed"],
     r"command line: fsdp2_groups: expected one of mst_hf, accelerate, axolotl, got 'deepspeed'"),
    ("recommend seq 0", R + ["--seq", "0"], r"--seq: '0': expected a decimal integer in \[1, 1073741824\]"),
    ("recommend for an unknown trainer", R + ["--for", "megatron"], r"recommend: for: expected one of hf-mst, deepspeed, axolotl, torchtitan, got 'megatron'"),
    ("max-seq for an unknown trainer", ["max-seq", "--model", "tiny-llama", "--for", "megatron"], r"max-seq: for: expected one of hf-mst, deepspeed, axolotl, torchtitan, got 'megatron'"),
    ("recommend for a trainer that cannot load the model", R + ["--for", "torchtitan"], r"recommend: for: a setup torchtitan can train as planned; none of those searched is: torchtitan: model: expected a model whose config.json names its Hugging Face repository"),
    ("recommend for a trainer that refuses the optimizer", ["recommend", "--model", "llama-3.2-1b", "--for", "torchtitan", "--optimizer", "sgd"], r"recommend: for: a setup torchtitan can train as planned; none of those searched is: torchtitan: setup.optimizer: expected adamw"),
    ("recommend seq -1", R + ["--seq", "-1"], r"--seq: '-1': expected a decimal integer in \[1, "),
    ("recommend tokens -5", R + ["--tokens-per-step", "-5"], r"--tokens-per-step: '-5': expected a decimal integer in \[1, "),
    ("recommend tokens 0", R + ["--tokens-per-step", "0"], r"--tokens-per-step: '0': "),
    ("margin nan", R + ["--margin", "nan"], r"--margin: 'nan': expected a finite number in \[0, 1\]"),
    ("margin inf", R + ["--margin", "inf"], r"--margin: 'inf': expected a finite number"),
    ("margin 1", R + ["--margin", "1"], r"--margin: 1: expected a fraction in \[0, 1\)"),
    ("margin negative", R + ["--margin", "-0.1"], r"--margin: '-0.1': expected a finite number in \[0, 1\]"),
    ("host-gib -1", R + ["--host-gib", "-1"], r"--host-gib: '-1': expected a finite number in \[0, 1048576\]"),
    ("host-gib nan", R + ["--host-gib", "nan"], r"--host-gib: 'nan': "),
    ("host-gib inf", R + ["--host-gib", "inf"], r"--host-gib: 'inf': "),
    ("host-gib 1e300", R + ["--host-gib", "1e300"], r"--host-gib: '1e300': "),
    ("report limit nan", ["report", str(SOURCE / "results"), "--check", "--max-peak-error", "nan"], r"--max-peak-error: 'nan': expected a finite number"),
    ("report limit negative", ["report", str(SOURCE / "results"), "--check", "--max-phase-error", "-1"], r"--max-phase-error: '-1': "),
    ("seed -1", M + ["--seed", "-1"], r"--seed: '-1': expected a decimal integer in \[0, 18446744073709551615\]"),
    ("seed 2^64", M + ["--seed", "18446744073709551616"], r"--seed: '18446744073709551616': "),
    ("workspace -1", M + ["--workspace-bytes", "-1"], r"--workspace-bytes: '-1': expected a decimal integer in \[0, "),
    ("bench reps 0", ["bench", "kernels", "--reps", "0"], r"--reps: '0': expected a decimal integer in \[1, 1000\]"),
    ("bench seq list", ["bench", "kernels", "--seq", "4096,0x10"], r"--seq: '0x10': expected a decimal integer"),
    ("pin beyond int64", R + ["--pin", "M_mlp=99999999999999999999"], r"--pin: M_mlp: expected an integer in \[1, 4096\], got '99999999999999999999'"),
    ("pin octal", R + ["--pin", "sp=010"], r"--pin: sp: expected an integer in \[1, 65536\], got '010'"),
    ("pin twice", R + ["--pin", "zero=2", "--pin", "zero=3"], r"--pin: zero: expected one value \(it is pinned twice; the second is '3'\)$"),
    ("pin twice by its other name", R + ["--pin", "M_mlp=4", "--pin", "mlp_chunks=8"], r"--pin: mlp_chunks: expected one value \(it is pinned twice; the second is '8'\)$"),
    ("pin a checkpoint count and a placement", R + ["--pin", "checkpoint=2", "--pin", "checkpoint=all"], r"--pin: checkpoint: expected one value \(it is pinned twice; the second is 'all'\)$"),
    ("pin micro-batch", R + ["--pin", "micro_batch=65537"], r"--pin: micro_batch: expected an integer in \[1, 65536\]"),
    ("measurement with fractional bytes", ["compare", "--run", write_json("frac.json", measured_event(2, 2, 8192.5))], r"frac.json: timeline: events\[2\].bytes: expected an integer in \[0, 1125899906842624\], got 8192.5"),
    ("measurement relabelled to another model", ["compare", "--run", write_json("relabel.json", changed(MEASURED, ["model"], "llama-3-8b"))], r"relabel.json: model: expected the timeline's model 'tiny-llama', got 'llama-3-8b'"),
    ("measurement with an unknown device key", ["compare", "--run", write_json("devkey.json", changed(MEASURED, ["device"], {"device": "cpu", "bogus": 1}))], r"devkey.json: device.bogus: unknown key"),
    ("Qwen3 config whose sliding layers have no window", ["show", write_json("qwen3_lt.json", {"model_type": "qwen3", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 100, "sliding_window": 8, "layer_types": ["full_attention", "sliding_attention"]})], r"qwen3_lt.json: layer_types: expected no sliding_attention layer when use_sliding_window is false"),
    ("odd head_dim", ["show", write_json("odd_head.json", {**TINY, "head_dim": 33})], r"odd_head.json: head_dim: expected an even size"),
    ("measurement on a tpu", ["compare", "--run", write_json("tpu.json", measured_event(2, 4, "tpu"))], r"tpu.json: timeline: events\[2\].device: expected gpu or host, got \"tpu\""),
    ("measurement micro-step -5", ["compare", "--run", write_json("micro.json", measured_event(2, 7, -5))], r"micro.json: timeline: events\[2\].micro_step: expected an integer in \[0, 0\], got -5"),
    ("measurement negative bytes", ["compare", "--run", write_json("negative.json", measured_event(2, 2, -8))], r"negative.json: timeline: events\[2\].bytes: expected an integer in \[0, "),
    ("measurement bytes as text", ["compare", "--run", write_json("text_bytes.json", measured_event(2, 2, "8192"))], r"text_bytes.json: timeline: events\[2\].bytes: expected an integer"),
    ("measurement tensor beyond int64", ["compare", "--run", write("tensor.json", json.dumps(MEASURED).replace('["alloc", 0,', '["alloc", 18446744073709551615,', 1))], r"tensor.json: timeline: events\[0\].tensor: expected an integer in \[0, 9223372036854775807\], got 18446744073709551615"),
    ("measurement with 11 columns", ["compare", "--run", write_json("columns.json", changed(MEASURED, ["timeline", "events", 1], MEASURED["timeline"]["events"][1] + ["x"]))], r"columns.json: timeline: events\[1\]: expected an array of 10 columns"),
    ("measurement phase", ["compare", "--run", write_json("phase.json", measured_event(2, 5, "warmup"))], r"phase.json: timeline: events\[2\]: phase: expected init, forward"),
    ("measurement events object", ["compare", "--run", write_json("events.json", changed(MEASURED, ["timeline", "events"], {}))], r"events.json: timeline: events: expected an array"),
    ("measurement without events", ["compare", "--run", write_json("no_events.json", changed(MEASURED, ["timeline", "events"], []))], r"no_events.json: timeline: events: expected the step's allocations and frees, got none"),
    ("timeline without events", ["compare", write_json("tl_empty.json", changed(MEASURED["timeline"], ["events"], [])), write_json("tl_ok.json", MEASURED["timeline"])], r"tl_empty.json: events: expected the step's allocations and frees, got none"),
    ("measurement columns in another order", ["compare", "--run", write_json("columns_order.json", changed(MEASURED, ["timeline", "columns"], ["tensor", "kind", "bytes", "category", "device", "phase", "layer", "micro_step", "op", "name"]))], r"columns_order.json: timeline: columns: expected \[kind, tensor, bytes, category, device, phase, layer, micro_step, op, name\] \(the order of each event's columns\), got"),
    ("trainer peaks reserved below allocated", ["compare", "--run", write_json("torch_reserved.json", changed(changed(TORCH, ["summary", "peak_reserved_bytes"], 0), ["summary", "peak_allocated_bytes"], 3670016))], r"torch_reserved.json: summary.peak_reserved_bytes: expected at least peak_allocated_bytes \(3670016\), got 0"),
    ("measurement micro_steps 0", ["compare", "--run", write_json("micro_steps.json", changed(MEASURED, ["timeline", "micro_steps"], 0))], r"micro_steps.json: timeline: micro_steps: expected an integer in \[1, 1048576\], got 0"),
    ("measurement recorded past its steps", ["compare", "--run", write_json("recorded.json", changed(MEASURED, ["timeline", "micro_steps_recorded"], 2))], r"recorded.json: timeline: micro_steps_recorded: expected an integer in \[1, 1\], got 2"),
    ("measurement backend tpu", ["compare", "--run", write_json("backend.json", changed(MEASURED, ["backend"], "tpu"))], r"backend.json: backend: expected one of cpu, cuda, torch, referee, got \"tpu\""),
    ("measurement unknown key", ["compare", "--run", write_json("unknown.json", changed(MEASURED, ["timeline_v2"], []))], r"unknown.json: timeline_v2: unknown key; .*the closest is timeline"),
    ("measurement setup the simulator refuses", ["compare", "--run", write_json("setup_refused.json", changed(changed(MEASURED, ["setup", "optimizer_in_backward"], True), ["setup", "grad_accum"], 2))], r"setup_refused.json: setup: optimizer_in_backward: expected false with grad_accum > 1"),
    ("deepspeed measurement of a rank past dp", ["compare", "--run", write_json("rank8.json", changed(load("results/referee/llama-3-8b.s4k.dp8.deepspeed.rank7.json"), ["timeline", "rank"], 8))], r"rank8.json: timeline.rank: expected one of the setup's ranks \(0 .. 7\), got 8"),
    ("measurement relabelled, in a report", ["report", write_json("relabel/m.json", changed(changed(MEASURED, ["model"], "llama-3-8b"), ["timeline", "model"], "llama-3-8b")), "--check"], r"relabel/m.json: model: expected the model its model_path holds \('tiny-llama'\), got 'llama-3-8b'"),
    ("measurement setup unknown key", ["compare", "--run", write_json("setup_key.json", changed(MEASURED, ["setup", "mlp_chunk"], 2))], r"setup_key.json: setup: mlp_chunk: unknown key; .*the closest is mlp_chunks"),
    ("measurement timeline unknown key", ["compare", "--run", write_json("tl_key.json", changed(MEASURED, ["timeline", "evnts"], []))], r"tl_key.json: timeline: evnts: unknown key; .*the closest is events"),
    ("measurement workspace fractional", ["compare", "--run", write_json("ws.json", changed(MEASURED, ["workspace_bytes"], 0.5))], r"ws.json: workspace_bytes: expected an integer in \[0, "),
    ("trainer peaks fractional", ["compare", "--run", write_json("torch_frac.json", changed(TORCH, ["summary", "peak_allocated_bytes"], 1.5))], r"torch_frac.json: summary.peak_allocated_bytes: expected an integer"),
    ("trainer run that failed", ["compare", "--run", str(SOURCE / "tests/data/torch_measure_oom.json")], r"torch_measure_oom.json: error: expected none: this run failed \(oom\) and recorded no step"),
    ("setup key misspelled", E + ["--setup", write_json("seqlen.json", {"sequence_length": 4096})], r"seqlen.json: sequence_length: unknown key; expected one of the keys this file takes \(the closest is seq_len\)"),
    ("setup key mlp_chunk", E + ["--setup", write_json("mlp_chunk.json", {"mlp_chunk": 4})], r"mlp_chunk.json: mlp_chunk: unknown key; .*closest is mlp_chunks"),
    ("model config as a setup", E + ["--setup", tiny_file], r"tiny.json: [a-z_]+: unknown key"),
    ("setup fractional seq", E + ["--setup", write_json("frac_seq.json", {"seq_len": 4096.5})], r"frac_seq.json: seq_len: expected an integer in \[1, 1073741824\], got 4096.5"),
    ("setup seq beyond int64", E + ["--setup", write("seq_big.json", '{"seq_len": 18446744073709551615}')], r"seq_big.json: seq_len: expected an integer in \[1, 1073741824\], got 18446744073709551615"),
    ("setup seq 1e20", E + ["--setup", write("seq_1e20.json", '{"seq_len": 1e20}')], r"seq_1e20.json: seq_len: expected an integer in \[1, 1073741824\], got 1e\+20"),
    ("setup boolean seq", E + ["--setup", write_json("bool_seq.json", {"seq_len": True})], r"bool_seq.json: seq_len: expected an integer in \[1, 1073741824\], got true"),
    ("setup padded as a string", E + ["--setup", write_json("padded.json", {"padded": "no"})], r"padded.json: padded: expected true or false, got \"no\""),
    ("setup checkpoint index", E + ["--setup", write_json("ckpt.json", {"checkpoint": [0, 2.5]})], r"ckpt.json: checkpoint: expected layer indices in 0..1, got 2.5"),
    ("setup checkpoint beyond int64", E + ["--setup", write("ckpt_big.json", '{"checkpoint": [18446744073709551615]}')], r"ckpt_big.json: checkpoint: expected layer indices in 0..1"),
    ("setup a list", E + ["--setup", write_json("list.json", [1, 2])], r"list.json: \(top level\): expected a JSON object, got an array"),
    ("setup precision", E + ["--setup", write_json("precision.json", {"precision": "fp8"})], r"precision.json: precision: expected one of pure-bf16, bf16-master, amp, got 'fp8'"),
    ("setup chunk tokens and chunks", E + ["--setup", write_json("both.json", {"mlp_chunks": 2, "mlp_chunk_tokens": 8})], r"both.json: mlp_chunk_tokens: expected either mlp_chunks or mlp_chunk_tokens"),
    ("profile key misspelled", E + ["--gpu", write_json("gpu_key.json", changed(PROFILE, ["hbm_gbs"], 1))], r"gpu_key.json: hbm_gbs: unknown key; .*closest is hbm_gbps"),
    ("profile calibration key", E + ["--gpu", write_json("cal_key.json", changed(PROFILE, ["calibration", "gemm_eff"], 0.5))], r"cal_key.json: calibration.gemm_eff: unknown key"),
    ("profile efficiency nan-like", E + ["--gpu", write_json("cal_big.json", changed(PROFILE, ["calibration", "gemm_efficiency"], 2.0))], r"cal_big.json: calibration.gemm_efficiency: expected a number in \[0.001, 1\], got 2.0"),
    ("profile without a host link", E + ["--gpu", write_json("gpu_nolink.json", changed(PROFILE, ["host_link_gbps"], 0))], r"gpu_nolink.json: host_link_gbps: expected a number in \[0.001, 1000000\], got 0"),
    ("profile without usable memory", E + ["--gpu", write_json("gpu_small.json", changed(PROFILE, ["reserved_overhead_bytes"], PROFILE["memory_total_bytes"]))], r"gpu_small.json: reserved_overhead_bytes: expected cuda_context_bytes \+ reserved_overhead_bytes below"),
    ("plan key misspelled", ["emit", "--plan", write_json("plan_key.json", changed(PLAN, ["gpus_"], 8)), "--format", "hf-mst"], r"plan_key.json: gpus_: unknown key; .*closest is gpus\)"),
    ("plan prediction key", ["emit", "--plan", write_json("pred_key.json", changed(PLAN, ["prediction", "peak_bytes"], 1)), "--format", "hf-mst"], r"pred_key.json: prediction.peak_bytes: unknown key"),
    ("plan relabelled", ["emit", "--plan", write_json("relabelled.json", changed(PLAN, ["model"], "mistral-7b-v0.1")), "--format", "deepspeed"], r"relabelled.json: prediction.peak_allocated_bytes: expected [0-9]+ \(the simulator's for model mistral-7b-v0.1"),
    ("plan on another GPU", ["emit", "--plan", write_json("other_gpu.json", changed(PLAN, ["gpu"], "a100-80gb")), "--format", "deepspeed"], r"other_gpu.json: prediction.peak_"),
    ("plan with an injected GPU name", ["emit", "--plan", write_json("inject.json", changed(PLAN, ["gpu"], 'h100\n[job]\ndump_folder = "/"')), "--format", "torchtitan"], r"h100\\n\[job\]\\ndump_folder = \"/\": file: expected a readable JSON file"),
    ("plan gpus 0", ["emit", "--plan", write_json("gpus0.json", changed(PLAN, ["gpus"], 0)), "--format", "hf-mst"], r"gpus0.json: gpus: expected an integer in \[1, 65536\], got 0"),
    ("plan without a model", ["emit", "--plan", write_json("no_model.json", changed(PLAN, ["model"], None)), "--format", "hf-mst"], r"no_model.json: model: missing"),
    ("MST_DATA_DIR without a catalog", ["models"], r"MST_DATA_DIR: /nonexistent: expected a folder holding models/ and profiles/"),
    ("MST_DATA_DIR for a name", ["show", "tiny-llama"], r"MST_DATA_DIR: /nonexistent: "),
    # 6. messages
    ("misspelled estimate", ["estmate"], r"command line: estmate: expected a subcommand \(.*\); the closest is estimate"),
    ("misspelled recommend", ["recomend", "--model", "x"], r"command line: recomend: expected a subcommand .*the closest is recommend"),
    ("misspelled max-seq", ["max_seq"], r"command line: max_seq: .*the closest is max-seq"),
    ("misspelled measure", ["--json", "measuer"], r"command line: measuer: .*the closest is measure"),
    ("misspelled compare", ["compre"], r"command line: compre: .*the closest is compare"),
    ("misspelled report", ["reprot"], r"command line: reprot: .*the closest is report"),
    ("no subcommand", [], r"command line: mst-plan: A subcommand is required"),
    ("missing required option", ["estimate"], r"command line: mst-plan estimate: --model is required"),
    ("unknown option", E + ["--sequence", "5"], r"command line: mst-plan estimate: The following arguments? (was|were) not expected"),
    ("option without a value", E + ["--seq"], r"command line: mst-plan estimate: "),
    ("reversed range", E + ["--checkpoint", "5-2"], r"command line: checkpoint: expected a layer range LO-HI with LO <= HI, got '5-2'"),
    ("range past the layers", E + ["--checkpoint", "0-9"], r"command line: checkpoint: layer range '0-9' outside 0..1"),
    ("every:0", E + ["--checkpoint", "every:0"], r"command line: checkpoint: 'every:0': K out of range for 2 layers"),
    ("checkpoint garbage", E + ["--checkpoint", "1,,2"], r"command line: checkpoint: expected none, all"),
    ("checkpoint octal", E + ["--checkpoint", "01"], r"command line: checkpoint: expected none, all"),
    ("unknown catalog name", ["show", "lama-3-8b"], r"lama-3-8b: model: expected a catalog name \(.*\) or a path to a .json file; the closest is llama-3-8b"),
    ("unknown GPU name", E + ["--gpu", "x100"], r"x100: gpu: expected a catalog name .*the closest is"),
    ("GPU name cut short", E + ["--gpu", "h100"], r"h100: gpu: expected a catalog name .*; h100-pcie-80gb and h100-sxm-80gb begin with it$"),
    ("name with a newline", ["show", "tiny\nllama"], r"tiny\\nllama: model: expected a catalog name"),
    ("unknown emit format", ["emit", "--plan", plan_file, "--format", "megatron"], r"emit: format: expected one of hf-mst, deepspeed, axolotl, torchtitan, got 'megatron'"),
    ("unknown backend", ["measure", "--backend", "tpu", "--model", "tiny-llama"], r"--backend: tpu: expected cpu or cuda"),
    ("caching allocator on the cpu", ["measure", "--model", "tiny-llama", "--seq", "16", "--allocator", "caching"], r"--allocator: caching: expected exact with --backend cpu \(the caching allocator is the CUDA backend's\)$"),
    ("no cupti on the cpu", ["measure", "--model", "tiny-llama", "--seq", "16", "--no-cupti"], r"--no-cupti: backend: expected --backend cuda \(CUPTI records a GPU's timeline\)$"),
    ("cpu backend out of its kernels", ["measure", "--model", write_json("gelu.json", {"model_type": "llama", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2, "vocab_size": 64, "hidden_act": "gelu"}), "--seq", "16"], r"gelu: hidden_act: expected silu or gelu_pytorch_tanh \(the cpu executor implements those\), got 'gelu'"),
    # 7. partial output: the first output written, a later one fails, nothing is left
    ("timeline then a missing folder", E + ["--timeline", o("a.json"), "--svg", o("missing-dir/x.svg")], r"missing-dir/x.svg: file: expected a writable path \(its folder does not exist\)"),
    ("timeline onto a folder", E + ["--timeline", str(OUT)], r"timeline-onto-a-folder: file: expected a file to write, got a directory"),
    ("svg onto a folder", E + ["--timeline", o("a.json"), "--svg", str(OUT)], r"svg-onto-a-folder: file: expected a file to write, got a directory"),
    ("emit into a folder holding a folder", ["emit", "--plan", write_json("axolotl_plan.json", PLAN), "--format", "axolotl", "--out", o("cfg")], r"ds_config.json: file: expected a file to write, got a directory"),
    ("emit refused after its folder", ["emit", "--plan", write_json("bf16_plan.json", changed(PLAN, ["setup", "zero_stage"], 0)), "--format", "deepspeed", "--out", o("new/cfg")], r"deepspeed: setup.precision|deepspeed: setup.|prediction."),
    ("measure refused after its folder", M[:-1] + ["100000000", "--out", o("run1")], r"measure: backend cpu: "),
    ("measure into a file", M + ["--out", o("taken")], r"taken: out: expected a directory that exists or can be created"),
    # An empty --attention is a mistake, not a request for the model's default attention.
    ("an empty model", ["estimate", "--model", ""], r"command line: argument 3: expected a value, got an empty one after '--model'"),
    ("an empty output path after =", ["recommend", "--model", "tiny-llama", "--out="], r"--out: '': expected a value"),
    ("an empty positional argument", ["show", ""], r"command line: argument 2: expected a value, got an empty one after 'show'"),
    ("an empty argument after a flag", ["--json", "show", ""], r"command line: argument 3: expected a value, got an empty one after 'show'"),
    ("a plan naming no model", ["emit", "--plan", write_json("plan_no_model.json", changed(PLAN, ["model"], "")), "--format", "deepspeed"], r"plan_no_model.json: model: expected a catalog name or a path to a .json file, got ''"),
    ("measurement live bytes past 2^63", ["compare", "--run", write_json("live_overflow.json", changed(MEASURED, ["timeline", "events"], [["alloc", 10**6 + k, 2**50, "transient", "gpu", "init", -1, 0, "x", "x"] for k in range(2**13)] + MEASURED["timeline"]["events"]))], r"live_overflow.json: timeline: events\[8191\].bytes: expected live bytes below 2\^63 after it"),
    ("measurement seed a string", ["compare", "--run", write_json("seed_str.json", changed(MEASURED, ["seed"], "abc"))], r"seed_str.json: seed: expected an integer"),
    ("measurement notes a number", ["compare", "--run", write_json("notes_num.json", changed(MEASURED, ["notes"], 5))], r"notes_num.json: notes: expected a list of strings, got 5"),
    ("measurement event past 2^50 bytes", ["compare", "--run", write_json("event_huge.json", measured_event(2, 2, 2**63 - 10**9))], r"event_huge.json: timeline: events\[2\].bytes: expected an integer in \[0, 1125899906842624\], got 9223372035854775808"),
    ("max-seq setup over more ranks than --gpus", ["max-seq", "--model", "tiny-llama", "--gpus", "8", "--dp", "16", "--checkpoint", "all"], r"command line: dp: expected --dp x --sp = --gpus 8 \(your setup's row is on the GPUs the others plan\), got 16 x 1"),
    ("json document and plan both on stdout", ["--json", "recommend", "--model", "tiny-llama", "--seq", "1024", "--out", "/dev/stdout"], r"/dev/stdout: file: expected a path other than standard output \(--json prints its document there\)"),
    ("recommend with an empty checkpoint pin", ["recommend", "--model", "tiny-llama", "--seq", "1024", "--pin", "checkpoint="], r"--pin: checkpoint: expected a count, a placement \(all, none, 0-15, every:2\), got ''"),
    ("recommend with an empty attention", ["recommend", "--model", "tiny-llama", "--seq", "1024", "--attention", ""], r"command line: argument 7: expected a value, got an empty one after '--attention'"),
    ("estimate with an empty attention", ["estimate", "--model", "tiny-llama", "--seq", "1024", "--attention", ""], r"command line: argument 7: expected a value, got an empty one after '--attention'"),
    ("recommend that fits nothing", ["recommend", "--model", "llama-3.1-70b", "--gpu", "rtx-4090-24gb", "--seq", "4096", "--out", o("plan.json")], r"llama-3.1-70b: no setup fits: expected one for 4096 tokens on 1 x rtx-4090-24gb within "),
    ("report check beside a mislabelled measurement", ["report", str(IN / "mislabelled"), "--check"], r"report: check: expected every measurement under the paths readable as mst-measure/1; 1 \*.json file left out: .*odd.json \(format 'mst-measure/1 ', not mst-measure/1\)"),
    ("report check beside a measurement cut short", ["report", str(IN / "cut"), "--check"], r"report: check: expected every measurement under the paths readable as mst-measure/1; 1 \*.json file left out: .*m.json \(json: expected valid JSON, parse error at byte"),
    ("report whose check fails", ["report", str(IN / "off"), "--check", "--out", o("README.md")], r"report: check: expected every measurement within 1 % of the predicted peak"),
    ("compare svg into a missing folder", ["compare", "--run", measured_file, "--svg", o("no/overlay.svg")], r"overlay.svg: file: expected a writable path"),
    ("bench output with no device", ["bench", "kernels", "--model", "tiny-llama", "--seq", "256", "--chunks", "2", "--reps", "1", "--out", o("bench.json")], r"bench kernels: "),
]

# Cases that need a prepared output folder or environment.
PREPARE = {
    "emit into a folder holding a folder": lambda folder: (folder / "cfg" / "ds_config.json").mkdir(parents=True),
    "measure into a file": lambda folder: (folder / "taken").write_text("kept\n"),
}
ENV = {"MST_DATA_DIR without a catalog": {"MST_DATA_DIR": "/nonexistent"},
       "MST_DATA_DIR for a name": {"MST_DATA_DIR": "/nonexistent"}}
# A GPU machine runs bench kernels; there it is not an error.
SKIP = {"bench output with no device"} if shutil.which("nvidia-smi") else set()


def snapshot(folder):
    return sorted(str(p.relative_to(folder)) + ("/" if p.is_dir() else "") for p in folder.rglob("*"))


def execute(argv, folder, env):
    """(exit code, stdout, stderr, seconds, peak KiB) of one run, or None past the time limit."""
    with open(folder.parent / (folder.name + ".stdout"), "w+b") as out, \
            open(folder.parent / (folder.name + ".stderr"), "w+b") as err:
        start = time.monotonic()
        proc = subprocess.Popen(argv, cwd=folder, stdout=out, stderr=err, env=env)
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            if time.monotonic() - start > TIME_LIMIT_S:
                proc.kill()
                os.wait4(proc.pid, 0)
                return None
            time.sleep(0.02)
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0), err.seek(0)
        return (proc.returncode, out.read().decode(errors="replace"), err.read().decode(errors="replace"),
                time.monotonic() - start, usage.ru_maxrss)


def check(case):
    """The problems of one case (empty when it holds), its seconds and its peak memory."""
    name, args, pattern = case
    folder = WORK / "runs" / re.sub(r"[^a-z0-9]+", "-", name.lower())
    folder.mkdir(parents=True)
    if name in PREPARE:
        PREPARE[name](folder)
    before = snapshot(folder)
    # Each case writes into a folder of its own: the paths into OUT in its arguments point there.
    argv = [str(BINARY)] + [a.replace(str(OUT), str(folder)) for a in args]
    result = execute(argv, folder, dict(os.environ, **ENV.get(name, {})))
    label = f"{name} (mst-plan {' '.join(args)[:160]!r})"
    if result is None:
        return [f"{label}: still running after {TIME_LIMIT_S} s: a hang"], TIME_LIMIT_S, 0
    code, out, err, seconds, peak_kib = result
    problems = []
    if code != 2:
        problems.append(f"exit {code}, expected 2")
    if out:
        problems.append(f"stdout not empty: {out[:200]!r}")
    if not ONE_LINE.match(err):
        problems.append(f"stderr is not one line 'error: <file or knob>: <field>: <expected>': {err[:400]!r}")
    elif not re.search(pattern, err[len("error: "):]):
        problems.append(f"the error line does not match {pattern!r}: {err.strip()!r}")
    if peak_kib > MEMORY_LIMIT_KIB:
        problems.append(f"used {peak_kib >> 10} MiB, more than {MEMORY_LIMIT_KIB >> 10} MiB")
    after = snapshot(folder)
    if after != before:
        problems.append(f"files left behind: {sorted(set(after) - set(before))}; removed: {sorted(set(before) - set(after))}")
    return [f"{label}: {p}" for p in problems], seconds, peak_kib


def main():
    cases = [c for c in CASES if c[0] not in SKIP]
    names = [c[0] for c in cases]
    assert len(set(names)) == len(names), "case names must be unique"
    with ThreadPoolExecutor(max_workers=2) as pool:
        results = list(pool.map(check, cases))
    failed = [problems for problems, _, _ in results if problems]
    for problems in failed:
        for p in problems:
            print("FAIL", p)
    seconds, slowest = max((r[1], c[0]) for r, c in zip(results, cases))
    peak, largest = max((r[2], c[0]) for r, c in zip(results, cases))
    print(f"{len(cases) - len(failed)} of {len(cases)} hostile cases exit 2 with one error line and leave nothing "
          f"behind; slowest {seconds:.1f} s ({slowest}), largest {peak >> 10} MiB ({largest})")
    shutil.rmtree(WORK, ignore_errors=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
