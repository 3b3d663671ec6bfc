"""Evaluation (issue 12): metrics with known answers, LogiQA option log-likelihood on a model whose
preference is known, and the LLM judge against a local stub HTTP server on loopback."""

from __future__ import annotations

import json
import math
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import SimpleNamespace

import pytest
import torch

from cpift_fast.pipeline import metrics
from cpift_fast.pipeline.evaluate import choice_scores, evaluate, option_logliks, score_predictions
from cpift_fast.pipeline.judge import Judge, JudgeError
from cpift_fast.pipeline.model import byte_level_tokenizer
from cpift_fast.pipeline.tasks import Chat, Task

# ----- GSM8K ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("prediction, strict, flexible", [
    ("3 + 4 = 7\n#### 7", True, True),
    ("The answer is 7.", False, True),                  # no '#### ': strict fails, flexible takes the last number
    ("#### 7\nbut later 9", True, False),               # strict takes the marked answer, flexible the last number
    ("#### $1,200.", False, False),                     # reference 7
    ("no number at all", False, False),
    ("#### -7", False, False),
])
def test_gsm8k_strict_and_flexible(prediction, strict, flexible):
    assert metrics.gsm8k_scores(prediction, "work...\n#### 7") == {"strict": strict, "flexible": flexible}


def test_gsm8k_cleanup_matches_lm_eval():
    assert metrics.gsm8k_scores("#### 1,200", "x\n#### 1200") == {"strict": True, "flexible": True}
    assert metrics.gsm8k_scores("It costs $1,200.", "#### 1200") == {"strict": False, "flexible": True}
    assert metrics.gsm8k_strict("a #### 5 b #### 6") == "5" and metrics.gsm8k_flexible("1 then 22") == "22"
    task = Task("g", [], [("q1", "#### 7"), ("q2", "#### 8")], metric="gsm8k")
    r = score_predictions(task, ["#### 7", "so 8"])
    assert r["metrics"] == {"strict": 0.5, "flexible": 1.0} and r["score"] == 0.5
    assert "strict" in r["normalization"]


# ----- BLEU, ROUGE-L, CodeBLEU -------------------------------------------------------------------------

def test_bleu_known_pairs():
    assert metrics.corpus_bleu(["def f(x): return x"], ["def f(x): return x"]) == pytest.approx(1.0)
    # every n-gram matches, hypothesis 4 tokens vs reference 5: BLEU = brevity penalty = exp(1 - 5/4)
    assert metrics.corpus_bleu(["a b c d"], ["a b c d e"]) == pytest.approx(math.exp(-0.25))
    # the cat sat on the mat / the cat is on the mat: p1 5/6, p2 3/5, p3 1/4, p4 0/3 -> 0.1/3 (smoothed)
    expected = math.exp((math.log(5 / 6) + math.log(3 / 5) + math.log(1 / 4) + math.log(0.1 / 3)) / 4)
    assert metrics.corpus_bleu(["the cat sat on the mat"], ["the cat is on the mat"]) == pytest.approx(expected)
    assert metrics.corpus_bleu(["x y z w"], ["a b c d"]) == 0.0
    assert metrics.code_tokens("foo(x1, 2.5)") == ["foo", "(", "x1", ",", "2.5", ")"]
    with pytest.raises(ValueError, match="2 predictions for 1"):
        metrics.corpus_bleu(["a", "b"], ["a"])


def test_code_metric_names_the_fallback():
    value, name = metrics.code_score(["return a + b"], ["return a + b"])
    assert value == pytest.approx(1.0)
    if metrics.codebleu_available():
        assert name.startswith("CodeBLEU")
    else:
        assert name.startswith("BLEU-4 (fallback")


def test_codebleu_when_installed():
    pytest.importorskip("codebleu", reason="the optional `codebleu` package is not installed")
    value, name = metrics.code_score(["def f(a, b):\n    return a + b"], ["def f(a, b):\n    return a + b"])
    assert name.startswith("CodeBLEU") and value > 0.9


def test_rouge_l_known_pairs():
    assert metrics.rouge_l("The cat sat.", "the CAT sat") == pytest.approx(1.0)
    # LCS("a b c d", "a x c y d z") = a c d = 3; P = 3/4, R = 3/6 -> F = 2PR/(P+R) = 0.6
    assert metrics.rouge_l("a b c d", "a x c y d z") == pytest.approx(0.6)
    assert metrics.rouge_l("", "x") == 0.0 and metrics.rouge_l("q", "x") == 0.0


# ----- LogiQA: option log-likelihood on a model with a known preference --------------------------------

class PreferX(torch.nn.Module):
    """Logits that ignore the input: token 'x' gets +5, every other token 0 (a known preference)."""

    def __init__(self, vocab: int, favourite: int):
        super().__init__()
        self.bias = torch.nn.Parameter(torch.zeros(vocab))
        with torch.no_grad():
            self.bias[favourite] = 5.0

    def forward(self, input_ids, attention_mask=None):
        return SimpleNamespace(logits=self.bias.expand(*input_ids.shape, -1))


def test_option_loglik_acc_and_acc_norm():
    tok = byte_level_tokenizer()
    model = PreferX(tok.vocab_size, ord("x"))
    lp = torch.log_softmax(model.bias, 0)
    good, bad = float(lp[ord("x")].detach()), float(lp[ord("y")].detach())
    ll = option_logliks(model, tok, "Question: pick\nAnswer: ", ["y", "yxxxxxxxxx", "xx"])
    assert ll == pytest.approx([bad, bad + 9 * good, 2 * good], rel=1e-5)
    # acc: the largest sum -> "xx"; acc_norm: per character, "yxxxxxxxxx" (-5.x/10) beats "y" but not "xx"
    assert choice_scores([ll], [["y", "yxxxxxxxxx", "xx"]], [2]) == {"acc": 1.0, "acc_norm": 1.0}
    ll2 = option_logliks(model, tok, "Q", ["y", "yxxxxxxxxx"])
    # acc picks "y" (one bad token beats one bad + nine good); acc_norm picks the long option
    assert choice_scores([ll2], [["y", "yxxxxxxxxx"]], [1]) == {"acc": 0.0, "acc_norm": 1.0}
    task = Task("lq", [], [(Chat((("user", "q"),), "Q: "), "xx"), (Chat((("user", "r"),), "R: "), "y")],
                metric="choice", meta={"choices": [["y", "xx"], ["y", "xx"]], "gold": [1, 0]})
    r = evaluate(model, tok, [task], progress=False)["lq"]
    assert r["metrics"] == {"acc": 0.5, "acc_norm": 0.5} and r["score"] == 0.5 and r["samples"][0][1] == "xx"


# ----- the judge, against a stub OpenAI-compatible server ---------------------------------------------

class _Stub:
    """Replies from a script: each item is (status, body); the last one repeats."""

    def __init__(self, script):
        self.script, self.requests = list(script), []

    def __enter__(self):
        stub = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802 - http.server's naming
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                stub.requests.append((self.path, dict(self.headers), body))
                status, reply = stub.script.pop(0) if len(stub.script) > 1 else stub.script[0]
                data = reply.encode() if isinstance(reply, str) else json.dumps(reply).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()


def _reply(text: str) -> dict:
    return {"choices": [{"message": {"role": "assistant", "content": text}}]}


def _judge(url: str, retries: int = 3) -> Judge:
    return Judge.from_env({"CPIFT_JUDGE_URL": url, "CPIFT_JUDGE_MODEL": "stub-judge", "CPIFT_JUDGE_API_KEY": "k",
                           "CPIFT_JUDGE_RETRIES": str(retries), "CPIFT_JUDGE_TIMEOUT": "5"})


def test_judge_rates_with_the_mt_bench_prompt():
    with _Stub([(200, _reply("Helpful and correct. Rating: [[8]]"))]) as stub:
        judge = _judge(stub.url)
        assert judge.rate("What is 2+2?", "4") == 8.0
    path, headers, body = stub.requests[0]
    assert path == "/v1/chat/completions" and headers["Authorization"] == "Bearer k"
    assert body["model"] == "stub-judge" and body["temperature"] == 0
    user = body["messages"][-1]["content"]
    assert "[Question]\nWhat is 2+2?" in user and "[The Start of Assistant's Answer]\n4\n" in user
    assert '"[[rating]]"' in user


def test_judge_retries_a_server_error_then_succeeds():
    with _Stub([(500, {"error": "overloaded"}), (200, _reply("[[6.5]]"))]) as stub:
        judge = Judge(url=stub.url, model="m", retries=3, backoff=0.0)
        assert judge.rate("q", "a") == 6.5
    assert len(stub.requests) == 2


@pytest.mark.parametrize("reply, why", [
    ((200, _reply("I like it a lot.")), "no \\[\\[rating\\]\\]"),
    ((200, _reply("Rating: [[11]]")), "outside 1..10"),
    ((200, {"unexpected": True}), "no choices"),
    ((200, "this is not json"), "malformed reply"),
    ((503, {"error": "down"}), "HTTP 503"),
])
def test_judge_gives_up_with_a_clear_error_and_no_score(reply, why):
    with _Stub([reply]) as stub:
        judge = Judge(url=stub.url, model="m", retries=2, backoff=0.0)
        with pytest.raises(JudgeError, match=f"gave no valid rating after 2 attempt\\(s\\):.*{why}"):
            judge.rate("q", "a")
    assert len(stub.requests) == 2


def test_judge_configuration_from_env():
    assert Judge.from_env({}) is None
    with pytest.raises(JudgeError, match="CPIFT_JUDGE_MODEL is not"):
        Judge.from_env({"CPIFT_JUDGE_URL": "http://127.0.0.1:9/v1"})
    assert _judge("http://h/v1/chat/completions").endpoint == "http://h/v1/chat/completions"


def test_judged_task_falls_back_to_rouge_and_says_so():
    task = Task("chat", [], [(Chat((("user", "hi"),), "U: hi\nA: "), "hello there")], metric="judge")
    offline = score_predictions(task, ["hello there"], judge=None)
    assert offline["score"] == pytest.approx(1.0) and "offline fallback" in offline["metric"]
    with _Stub([(200, _reply("[[7]]"))]) as stub:
        judged = score_predictions(task, ["hello there"], judge=Judge(url=stub.url, model="m", backoff=0.0))
    assert judged["score"] == pytest.approx(0.7) and judged["metrics"] == {"judge_mean": 7.0}
    assert "stub" not in judged["metric"] and "LLM judge m" in judged["metric"]
