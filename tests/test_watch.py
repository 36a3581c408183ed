"""Watching a run: samples while training, TensorBoard, and compare.py's HTML report.

Real runs of minigpt2's trainer on a tiny model and the shared Chinese text; the event files are
read back with TensorBoard's own reader, the HTML is parsed, and (where chromium is installed)
rendered in a real headless browser."""

import shutil
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import pytest
import torch
from clis import ROOT, offline_env, run_script

from minigpt2 import GPT, GPTConfig, MiniGPT2Error, save_model
from minigpt2.analysis.compare import compare, compare_many
from minigpt2.analysis.htmlreport import render_html, write_html
from minigpt2.analysis.report import render
from minigpt2.console import TrainConsole
from minigpt2.files import append_jsonl, read_jsonl
from minigpt2.io.tokenizer import load_tokenizer
from minigpt2.text import one_line, visible
from minigpt2.training import distributed
from minigpt2.training import setup_run as launch
from minigpt2.training.options import TrainOptions
from minigpt2.training.rundir import RunDir
from minigpt2.training.watch import DEFAULT_SAMPLE_PROMPTS, TensorBoardLog, draw_samples

STEPS, EVAL_EVERY, SNAPSHOT_EVERY = 12, 4, 4
PROMPTS = ["他走进屋里，看见", "It was"]


def start_model(test_data: Path, root: Path) -> Path:
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=32, n_positions=32))
    return save_model(model, root / "start", tokenizer_source=test_data / "gpt2")


def train_run(test_data: Path, root: Path, name: str, start: Path, board: Path | None = None, **options) -> Path:
    """A run of the trainer, set up as train.py sets it up; each record also goes to TensorBoard
    (when `board` is given) and to a console writing into RUN/console.txt."""
    chinese = root / "红楼梦-start.txt"
    if not chinese.exists():
        text = (test_data / "zh" / "红楼梦.txt").read_text(encoding="utf-8")[:20_000]
        chinese.write_text(text, encoding="utf-8")
    options = {"data": [str(chinese)], "model": str(start), "steps": STEPS, "batch_size": 2, "seq_len": 32,
               "lr": 1e-2, "warmup": 0, "eval_every": EVAL_EVERY, "eval_tokens": 64, "save_every": 0,
               "snapshot_every": SNAPSHOT_EVERY, "device": "cpu", "cache_dir": str(root / "tokens"),
               "val_fraction": 0.1, "sample_tokens": 8, **options}  # fmt: skip
    run = root / name
    given = TrainOptions(**options, out=str(run))
    setup = launch.setup(given, launch.SavedRun(None, None), lambda record: None, distributed.setup("cpu"))
    writer = TensorBoardLog(board) if board is not None else None
    with open(run / "console.txt", "w", encoding="utf-8") as out:
        console = TrainConsole(out, out)
        for record in setup.trainer.run():
            console.show(record)
            if writer is not None:
                writer.write(record)
    if writer is not None:
        writer.close()
    setup.run.unlock()
    return run


@pytest.fixture(scope="module")
def runs(test_data, tmp_path_factory):
    root = tmp_path_factory.mktemp("watch")
    start = start_model(test_data, root)
    sampled = train_run(test_data, root, "sampled", start, board=root / "board", sample_prompt=PROMPTS)
    plain = train_run(test_data, root, "plain", start, sample_tokens=0)
    return {"root": root, "start": start, "sampled": sampled, "plain": plain, "board": root / "board"}


def records(run: Path, kind: str) -> list[dict]:
    return [r for r in RunDir(run).read_log() if r["type"] == kind]


# ----- samples while training -------------------------------------------------------------


def test_samples_are_drawn_at_every_evaluation_and_logged(runs):
    drawn = records(runs["sampled"], "samples")
    assert [r["step"] for r in drawn] == list(range(0, STEPS + 1, EVAL_EVERY))
    for r in drawn:
        assert [s["prompt"] for s in r["samples"]] == PROMPTS
        assert r["seed"] == 0 and r["max_new_tokens"] == 8 and r["seconds"] > 0
        for s in r["samples"]:
            assert 1 <= s["tokens"] <= 8 and "\ufffd" not in s["text"]  # whole characters only (the guard)
    # the model changes between evaluations, and so do its samples
    assert drawn[0]["samples"][0]["text"] != drawn[-1]["samples"][0]["text"]
    console = (runs["sampled"] / "console.txt").read_text(encoding="utf-8")
    assert console.count("sample step") == 2 * len(drawn)
    line = next(x for x in console.splitlines() if x.startswith(f"sample step {STEPS:>3} | [{PROMPTS[0]}]"))
    assert one_line(drawn[-1]["samples"][0]["text"]) in line
    # each sample line comes right after its evaluation's line (a progress line may say it samples between)
    lines = [x for x in console.splitlines() if not x.startswith("progress: ")]
    assert "progress: step 0/12: sampling 2 prompts (8 new tokens each; Ctrl-C stops it)" in console
    first = lines.index(next(x for x in lines if x.startswith("sample step")))
    assert lines[first - 1].startswith("eval step")


def test_samples_do_not_change_training(runs):
    """The draw has its own generator and runs with dropout off: a run with samples trains
    exactly as one without (same losses, same weights)."""
    with_samples = [r["loss"] for r in records(runs["sampled"], "train")]
    without = [r["loss"] for r in records(runs["plain"], "train")]
    assert with_samples == without and len(without) == STEPS
    assert not records(runs["plain"], "samples")
    a = RunDir(runs["sampled"]).model_checkpoint()
    b = RunDir(runs["plain"]).model_checkpoint()
    assert (a / "model.safetensors").read_bytes() == (b / "model.safetensors").read_bytes()


def test_the_same_model_and_seed_give_the_same_sample(runs):
    """A sample at step 0 is the start model's: drawn again here from the saved start, it matches."""
    from minigpt2.io.weights import load_model

    model = load_model(str(runs["start"]))
    enc = load_tokenizer(str(runs["start"]))
    state = torch.random.get_rng_state()
    again = draw_samples(model, enc, PROMPTS, 8)
    assert torch.equal(state, torch.random.get_rng_state())  # the global random state is untouched
    assert [s["text"] for s in again] == [s["text"] for s in records(runs["sampled"], "samples")[0]["samples"]]
    assert not model.training  # (loaded for inference; draw_samples restores the mode it found)
    model.train()
    draw_samples(model, enc, PROMPTS[:1], 2)
    assert model.training


def test_default_prompts_are_one_chinese_and_one_english():
    (zh, en) = DEFAULT_SAMPLE_PROMPTS
    assert any("\u4e00" <= c <= "\u9fff" for c in zh) and en.isascii()


def test_compare_shows_a_runs_samples_step_by_step(runs):
    result = compare(str(runs["sampled"]))
    samples = result["runs"][0]["curves"]["samples"]
    assert [s["step"] for s in samples] == list(range(0, STEPS + 1, EVAL_EVERY))
    text = render(result)
    assert "== Samples while training: run" in text
    block = text[text.index("== Samples while training") :]
    for step in range(0, STEPS + 1, EVAL_EVERY):
        assert f"  step {step} " in block
    assert f'prompt 1: "{PROMPTS[0]}"' in block and f'prompt 2: "{PROMPTS[1]}"' in block


def test_hidden_characters_in_a_sample_are_spelled_out_and_logs_keep_them(tmp_path):
    text = "a\u202eb\u2028c\nd\te\u0085"
    assert one_line(text) == "a\\u202eb\\u2028c↵d\te\\u0085"
    assert visible(text, "\n") == "a\\u202eb\\u2028c\nd\te\\u0085"
    # JSON keeps U+2028 and U+0085 raw inside a string: reading the log must not cut the line there
    append_jsonl(tmp_path / "log.jsonl", {"type": "samples", "text": text})
    append_jsonl(tmp_path / "log.jsonl", {"type": "eval", "step": 1})
    assert read_jsonl(tmp_path / "log.jsonl") == [{"type": "samples", "text": text}, {"type": "eval", "step": 1}]


# ----- TensorBoard ------------------------------------------------------------------------


def test_tensorboard_event_files_hold_every_series(runs):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    board = EventAccumulator(str(runs["board"]), size_guidance={"scalars": 0, "tensors": 0})
    board.Reload()
    scalars = board.Tags()["scalars"]
    for tag in ("train/loss", "train/lr", "train/grad_norm", "train/tokens_per_s", "eval/val/loss", "eval/val/bpc"):
        assert tag in scalars, tag
    logged = records(runs["sampled"], "train")
    assert [e.step for e in board.Scalars("train/loss")] == [r["step"] for r in logged]
    assert [e.value for e in board.Scalars("train/loss")] == pytest.approx([r["loss"] for r in logged], rel=1e-6)
    evals = [r for r in records(runs["sampled"], "eval") if r["set"] == "val"]
    assert [e.value for e in board.Scalars("eval/val/bpc")] == pytest.approx([r["bpc"] for r in evals], rel=1e-6)
    # drift per layer, the figure compare.py shows for the run (pooled with the start's norms)
    drift = compare(str(runs["sampled"]))["runs"][0]["steps"]
    h0 = board.Scalars("drift/weights/h.0")
    assert [e.step for e in h0] == [s["step"] for s in drift]
    assert [e.value for e in h0] == pytest.approx([s["weight_drift"]["h.0"] for s in drift], rel=1e-5)
    assert "drift/activations/h.1" in scalars
    # the samples, as text at each evaluation
    texts = board.Tags()["tensors"]
    assert "samples/prompt 1/text_summary" in texts
    events = board.Tensors("samples/prompt 1/text_summary")
    assert [e.step for e in events] == list(range(0, STEPS + 1, EVAL_EVERY))
    last = events[-1].tensor_proto.string_val[0].decode("utf-8")
    assert PROMPTS[0] in last and records(runs["sampled"], "samples")[-1]["samples"][0]["text"].strip() in last


@pytest.mark.slow
def test_tensorboard_without_the_package_says_which_extra_to_install(test_data, tmp_path):
    """train.py with the tensorboard package hidden: one line, before any work or folder."""
    code = (
        "import sys, runpy; sys.modules['tensorboard'] = None; sys.argv = sys.argv[1:]; "
        "runpy.run_path(sys.argv[0], run_name='__main__')"
    )
    args = ["--data", test_data / "zh" / "三国演义.txt", "--out", tmp_path / "run", "--tensorboard"]
    result = subprocess.run(
        [sys.executable, "-c", code, str(ROOT / "train.py"), *map(str, args)],
        capture_output=True, text=True, encoding="utf-8", env=offline_env(), cwd=ROOT, timeout=120,
    )  # fmt: skip
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    assert result.stderr.strip().splitlines() == [
        "error: --tensorboard needs the tensorboard package, which is not installed: pip install tensorboard "
        "(or install minigpt2 with its 'tensorboard' extra: pip install -e \".[tensorboard]\")"
    ]
    assert not (tmp_path / "run").exists()


# ----- the HTML report --------------------------------------------------------------------


class Page(HTMLParser):
    """What the checks need from a page: ids, tags, attributes, and the text."""

    def __init__(self, text: str):
        super().__init__()
        self.ids, self.tags, self.attrs, self.text = set(), [], [], []
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        self.attrs += attrs
        self.ids.update(v for k, v in attrs if k == "id")

    def handle_data(self, data):
        self.text.append(data)


@pytest.fixture(scope="module")
def report(runs, test_data):
    en = runs["root"] / "english.txt"
    en.write_text((test_data / "en" / "tinyshakespeare.txt").read_text(encoding="utf-8")[:5000], encoding="utf-8")
    zh = runs["root"] / "红楼梦-start.txt"
    return compare(str(runs["start"]), str(runs["sampled"]), prompts=PROMPTS, texts=[str(zh), str(en)],
                   max_eval_tokens=256, sample_tokens=6)  # fmt: skip


def test_the_html_holds_every_section_and_nothing_from_outside(report):
    page = render_html(report)
    parsed = Page(page)
    for ident in ("summary", "curves-B", "samples-B", "prompts", "heatmap", "weights", "behaviour", "drift-B", "text"):
        assert ident in parsed.ids, ident
    # self-contained: no scripts, no external files, no address anywhere
    assert "http://" not in page and "https://" not in page and "//" not in "".join(v or "" for _, v in parsed.attrs)
    assert not {"script", "link", "img", "iframe", "object"} & set(parsed.tags)
    assert not [k for k, _ in parsed.attrs if k in ("src", "href")]
    assert '<meta name="viewport"' in page and "@media" in page and parsed.tags.count("svg") >= 4
    text = "".join(parsed.text)
    # the samples of every evaluation, and both continuations of every prompt
    for r in report["runs"][0]["curves"]["samples"]:
        assert f"step {r['step']}" in text
        for s in r["samples"]:
            assert visible(s["text"], "\n") in text
    for act in report["activations"]:
        assert act["continuation_a"] and act["continuation_b"]
        assert visible(act["continuation_a"], "\n") in text and visible(act["continuation_b"], "\n") in text
    # the terminal report, whole
    assert render(report) in text
    # the behaviour table's figures
    assert f"{report['behaviour'][0]['b']['loss']:.4g}" in text


def test_the_html_is_written_atomically_and_never_over_a_file_unasked(report, tmp_path):
    path = tmp_path / "r.html"
    assert write_html(report, path) == path
    first = path.read_text(encoding="utf-8")
    with pytest.raises(MiniGPT2Error, match="already exists"):
        write_html(report, path)
    assert path.read_text(encoding="utf-8") == first
    write_html(report, path, force=True)
    assert [p.name for p in tmp_path.iterdir()] == ["r.html"]  # no temporary file left


def test_several_models_make_a_tradeoff_page(runs, test_data):
    zh = runs["root"] / "红楼梦-start.txt"
    en = runs["root"] / "english.txt"
    result = compare_many(str(runs["start"]), [str(runs["sampled"]), str(runs["plain"])], texts=[str(zh), str(en)],
                          max_eval_tokens=128)  # fmt: skip
    page = Page(render_html(result))
    assert {"tradeoff", "text"} <= page.ids and "svg" in page.tags
    assert str(runs["plain"]) in "".join(page.text)


@pytest.mark.slow
def test_compare_cli_writes_the_html(runs, tmp_path):
    out = run_script("compare.py", runs["sampled"], "--prompt", PROMPTS[0], "--html", tmp_path / "r.html",
                     "--sample-tokens", "4", timeout=300)  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert f"wrote {tmp_path / 'r.html'}" in out.stdout and "continuations (the same seed for both):" in out.stdout
    assert "prompts" in Page((tmp_path / "r.html").read_text(encoding="utf-8")).ids
    again = run_script("compare.py", runs["sampled"], "--html", tmp_path / "r.html", timeout=300)
    assert again.returncode == 1 and again.stderr.startswith("error: ") and "--force" in again.stderr


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.slow
@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (apt-get install chromium fonts-noto-cjk)")
@pytest.mark.parametrize("width", [390, 1200])
def test_the_html_renders_in_a_real_browser(report, tmp_path, width):
    """Headless chromium draws the page at a phone's and a desktop's width; the page is not blank,
    and nothing in it is wider than the screen (the wide tables scroll inside their own box)."""
    path = write_html(report, tmp_path / "r.html")
    shot = tmp_path / "shot.png"
    common = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", f"--window-size={width},2000"]
    done = subprocess.run([*common, f"--screenshot={shot}", path.as_uri()], capture_output=True, timeout=180)
    assert done.returncode == 0 and shot.is_file(), done.stderr
    from matplotlib import image

    pixels = image.imread(shot)  # (height, width, channels)
    assert pixels.shape[1] == width and pixels[..., :3].std() > 0.05
    # the page's own measure of its width against the window's, printed into the DOM by a probe
    # copy of the page (chromium lays --dump-dom out at least 500px wide: the screenshot is the phone)
    probe = tmp_path / "probe.html"
    measure = "<script>var d=document.documentElement;document.title=d.scrollWidth+' '+d.clientWidth</script></body>"
    probe.write_text(path.read_text(encoding="utf-8").replace("</body>", measure), encoding="utf-8")
    dom = subprocess.run([*common, "--dump-dom", probe.as_uri()], capture_output=True, text=True, timeout=180)
    page_width, window = map(int, dom.stdout[dom.stdout.index("<title>") + 7 : dom.stdout.index("</title>")].split())
    assert page_width <= window, f"the page is {page_width}px wide in a {window}px window"


@pytest.mark.slow
def test_train_cli_logs_to_tensorboard_and_a_resumed_run_continues_the_log(test_data, tmp_path):
    run = tmp_path / "run"
    common = ["--data", test_data / "zh" / "三国演义.txt", "--init-preset", "gpt2", "--n-layer", "1", "--n-head", "2",
              "--n-embd", "32", "--context", "32", "--tokenizer", test_data / "gpt2", "--batch-size", "2",
              "--seq-len", "16", "--eval-tokens", "32", "--eval-every", "3", "--save-every", "3", "--device", "cpu",
              "--sample-prompt", "天下大势", "--sample-tokens", "4", "--out", run, "--tensorboard"]  # fmt: skip
    env = offline_env(MINIGPT2_CACHE=str(tmp_path / "tokens"))
    first = run_script("train.py", *common, "--steps", "6", env=env, timeout=300)
    assert first.returncode == 0, first.stderr
    assert first.stdout.count("sample step") == 3 and "[天下大势]" in first.stdout
    second = run_script("train.py", *common, "--steps", "9", "--resume", env=env, timeout=300)
    assert second.returncode == 0, second.stderr
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    board = EventAccumulator(str(run / "tensorboard"), size_guidance={"scalars": 0, "tensors": 0})
    board.Reload()
    assert [e.step for e in board.Scalars("train/loss")] == list(range(1, 10))
    assert [e.step for e in board.Tensors("samples/prompt 1/text_summary")] == [0, 3, 6, 9]
    assert len(list((run / "tensorboard").glob("events.out.tfevents.*"))) == 2
