"""An LLM judge through any OpenAI-compatible chat-completions endpoint (MT-Bench single-answer grading).

Configured by environment variables (never by the config file, so keys stay out of run records):

    CPIFT_JUDGE_URL       base URL (``http://host:8000/v1``) or the full ``.../chat/completions`` URL
    CPIFT_JUDGE_MODEL     the judge model's name (required with the URL)
    CPIFT_JUDGE_API_KEY   bearer token (optional)
    CPIFT_JUDGE_RETRIES   attempts per answer (default 3); CPIFT_JUDGE_TIMEOUT seconds (default 60)

Each answer is graded 1–10 with the MT-Bench single-answer prompt (Zheng et al. 2023), temperature
0; the rating is read from ``[[N]]``. A server error, a timeout or a reply without a rating in
[1, 10] is retried; after the last attempt ``JudgeError`` says what went wrong. A score is never
invented.
"""

from __future__ import annotations

import json
import os
import re
import time
import urllib.error
import urllib.request
from dataclasses import dataclass

SYSTEM = "You are a helpful assistant."
TEMPLATE = (
    "[Instruction]\nPlease act as an impartial judge and evaluate the quality of the response provided by an AI "
    "assistant to the user question displayed below. Your evaluation should consider factors such as the "
    "helpfulness, relevance, accuracy, depth, creativity, and level of detail of the response. Begin your "
    "evaluation by providing a short explanation. Be as objective as possible. After providing your explanation, "
    "you must rate the response on a scale of 1 to 10 by strictly following this format: \"[[rating]]\", for "
    "example: \"Rating: [[5]]\".\n\n[Question]\n{question}\n\n[The Start of Assistant's Answer]\n{answer}\n"
    "[The End of Assistant's Answer]"
)
_RATING = re.compile(r"\[\[(\d+(?:\.\d+)?)\]\]")


class JudgeError(RuntimeError):
    """The judge could not grade an answer (after every retry)."""


@dataclass(frozen=True)
class Judge:
    url: str
    model: str
    api_key: str | None = None
    retries: int = 3
    timeout: float = 60.0
    backoff: float = 1.0

    @classmethod
    def from_env(cls, environ=None) -> Judge | None:
        """The judge the environment configures, or None when CPIFT_JUDGE_URL is unset."""
        env = os.environ if environ is None else environ
        url = env.get("CPIFT_JUDGE_URL")
        if not url:
            return None
        model = env.get("CPIFT_JUDGE_MODEL")
        if not model:
            raise JudgeError("CPIFT_JUDGE_URL is set but CPIFT_JUDGE_MODEL is not: name the judge model")
        try:
            retries = int(env.get("CPIFT_JUDGE_RETRIES", "3"))
            timeout = float(env.get("CPIFT_JUDGE_TIMEOUT", "60"))
        except ValueError as exc:
            raise JudgeError(f"CPIFT_JUDGE_RETRIES / CPIFT_JUDGE_TIMEOUT: {exc}") from None
        if retries < 1 or timeout <= 0:
            raise JudgeError("CPIFT_JUDGE_RETRIES must be ≥ 1 and CPIFT_JUDGE_TIMEOUT > 0")
        return cls(url=url, model=model, api_key=env.get("CPIFT_JUDGE_API_KEY") or None, retries=retries,
                   timeout=timeout)

    @property
    def endpoint(self) -> str:
        u = self.url.rstrip("/")
        return u if u.endswith("/chat/completions") else u + "/chat/completions"

    def describe(self) -> str:
        return f"LLM judge {self.model} at {self.endpoint} (MT-Bench single-answer prompt, 1–10)"

    def _ask(self, question: str, answer: str) -> str:
        body = json.dumps({"model": self.model, "temperature": 0, "max_tokens": 1024,
                           "messages": [{"role": "system", "content": SYSTEM},
                                        {"role": "user", "content": TEMPLATE.format(question=question, answer=answer)}]})
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        req = urllib.request.Request(self.endpoint, data=body.encode(), headers=headers, method="POST")
        with urllib.request.urlopen(req, timeout=self.timeout) as resp:
            reply = json.loads(resp.read().decode("utf-8"))
        try:
            return reply["choices"][0]["message"]["content"]
        except (KeyError, IndexError, TypeError):
            raise ValueError(f"reply has no choices[0].message.content: {json.dumps(reply)[:200]}") from None

    def rate(self, question: str, answer: str) -> float:
        """The judge's 1–10 rating of `answer` to `question`."""
        problems = []
        for attempt in range(self.retries):
            try:
                text = self._ask(question, answer)
                found = _RATING.findall(text)
                if not found:
                    raise ValueError(f"no [[rating]] in the reply {text[:120]!r}")
                rating = float(found[-1])
                if not 1.0 <= rating <= 10.0:
                    raise ValueError(f"rating {rating} is outside 1..10")
                return rating
            except urllib.error.HTTPError as exc:
                problems.append(f"HTTP {exc.code} {exc.reason}")
            except (urllib.error.URLError, TimeoutError, OSError) as exc:
                problems.append(f"{type(exc).__name__}: {exc}")
            except (ValueError, json.JSONDecodeError) as exc:
                problems.append(f"malformed reply: {exc}")
            if attempt + 1 < self.retries:
                time.sleep(self.backoff * (attempt + 1))
        raise JudgeError(f"judge {self.model} at {self.endpoint} gave no valid rating after {self.retries} "
                         f"attempt(s): {'; '.join(problems)}")
