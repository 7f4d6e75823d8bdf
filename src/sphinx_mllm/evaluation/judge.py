"""Judge-scored benchmarks (MM-Vet, InfiMM-Eval, BenchLMM): a judge LLM at an OpenAI-compatible endpoint
grades each answer against the reference with a number between 0 and 1 (MM-Vet's scale; the benchmark
score is the mean x 100, also per category).

The endpoint is the user's: `base_url` (e.g. `http://127.0.0.1:8000/v1`), a model name and the name of an
environment variable holding the API key (the key itself is never stored or logged). Exactly one URL is
ever requested: `{base_url}/chat/completions`. A reply without a readable score is retried, then scored 0
and counted in `judge_failures`.
"""

from __future__ import annotations

import os
import re
import time
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from sphinx_mllm.utils.errors import SphinxError
from sphinx_mllm.utils.logging import get_logger

log = get_logger(__name__)

GRADER_PROMPT = """You grade answers of an AI assistant about images. Compare the model answer with the \
ground-truth answer and reply with one number between 0.0 and 1.0: 1.0 when the answer is fully correct, \
0.0 when it is wrong or missing, a value in between for partly correct answers (for example, half of the \
required items right gives 0.5). "<AND>" in a ground truth means every part is required; "<OR>" means any \
one suffices. Judge correctness only, not style or length. Reply with the number only.

Examples:
Question: What is x in the equation? | Ground truth: -1 <AND> -5 | Model answer: x = 3 | Score: 0.0
Question: What is x in the equation? | Ground truth: -1 <AND> -5 | Model answer: x = -1 or x = -5 | Score: 1.0
Question: What is x in the equation? | Ground truth: -1 <AND> -5 | Model answer: x = -5 | Score: 0.5
Question: Which animals are in the picture? | Ground truth: cat <OR> kitten | Model answer: a kitten | Score: 1.0

Question: {question} | Ground truth: {answer} | Model answer: {prediction} | Score:"""

_NUMBER = re.compile(r"(?<![\d.])(\d+(?:\.\d+)?)")


@dataclass(frozen=True)
class JudgeConfig:
    """Where the judge runs. `api_key_env` names an environment variable (None: no key sent)."""

    base_url: str
    model: str
    api_key_env: str | None = "OPENAI_API_KEY"
    timeout_s: float = 60.0
    max_attempts: int = 3
    max_tokens: int = 8

    def __post_init__(self) -> None:
        if not re.match(r"^https?://[^\s/]+", self.base_url):
            raise SphinxError(f"judge base URL must be http(s)://host[:port][/path], got {self.base_url!r}")
        if not self.model:
            raise SphinxError("the judge needs a model name")
        if self.max_attempts < 1:
            raise SphinxError("judge max_attempts must be at least 1")

    @property
    def url(self) -> str:
        return self.base_url.rstrip("/") + "/chat/completions"


def parse_score(text: str) -> float | None:
    """The first number of a reply, if it lies in [0, 1]."""
    m = _NUMBER.search(text or "")
    if not m:
        return None
    value = float(m.group(1))
    return value if 0.0 <= value <= 1.0 else None


class Judge:
    """Grades answers through the configured endpoint (`httpx`, one client, closed by `close()`)."""

    def __init__(self, config: JudgeConfig, client: Any | None = None) -> None:
        try:
            import httpx
        except ImportError as exc:
            raise SphinxError("judge-scored benchmarks need httpx: pip install httpx") from exc
        self.config = config
        headers = {"Content-Type": "application/json"}
        if config.api_key_env:
            key = os.environ.get(config.api_key_env)
            if not key:
                raise SphinxError(f"the judge's API key variable {config.api_key_env} is not set "
                                  "(set it, or configure no key for a local endpoint)")
            headers["Authorization"] = f"Bearer {key}"
        self._httpx = httpx
        self.client = client or httpx.Client(timeout=config.timeout_s, headers=headers, follow_redirects=False)

    def close(self) -> None:
        self.client.close()

    def __enter__(self) -> Judge:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _ask(self, prompt: str) -> str:
        body = {"model": self.config.model, "messages": [{"role": "user", "content": prompt}],
                "temperature": 0.0, "max_tokens": self.config.max_tokens}
        resp = self.client.post(self.config.url, json=body)
        if resp.status_code != 200:
            raise SphinxError(f"judge endpoint answered HTTP {resp.status_code}: {resp.text[:200]}")
        try:
            return str(resp.json()["choices"][0]["message"]["content"])
        except (ValueError, KeyError, IndexError, TypeError):
            raise SphinxError(f"judge reply is not an OpenAI chat completion: {resp.text[:200]}") from None

    def grade(self, question: str, answer: str, prediction: str) -> float | None:
        """A score in [0, 1], or None when no attempt gave one."""
        prompt = GRADER_PROMPT.format(question=question, answer=answer, prediction=prediction.replace("\n", " "))
        for attempt in range(self.config.max_attempts):
            try:
                score = parse_score(self._ask(prompt))
                if score is not None:
                    return score
                log.warning("judge reply without a score in [0, 1] (attempt %d)", attempt + 1)
            except (SphinxError, self._httpx.HTTPError) as exc:
                log.warning("judge request failed (attempt %d): %s", attempt + 1, exc)
            if attempt + 1 < self.config.max_attempts:
                time.sleep(min(2.0 ** attempt * 0.5, 8.0))
        return None


def score_judged(predictions: Sequence[Mapping[str, Any]], references: Sequence[Mapping[str, Any]],
                 judge: Judge) -> dict[str, Any]:
    """{"score": mean x 100, "by_category": {...}, "judge_failures": n, "per_item": {id: score}}."""
    texts = {str(p["id"]): str(p.get("text", "")) for p in predictions}
    per_item: dict[str, float] = {}
    by_cat: dict[str, list[float]] = defaultdict(list)
    failures = 0
    for ref in references:
        rid = str(ref["id"])
        score = judge.grade(str(ref["question"]), str(ref["answer"]), texts.get(rid, ""))
        if score is None:
            failures += 1
            score = 0.0
        per_item[rid] = score
        cats = ref.get("category") or []
        for cat in [cats] if isinstance(cats, str) else cats:
            by_cat[str(cat)].append(score)
    if not per_item:
        raise SphinxError("no judged item")
    return {
        "score": 100.0 * sum(per_item.values()) / len(per_item),
        "by_category": {c: 100.0 * sum(v) / len(v) for c, v in sorted(by_cat.items())},
        "judge_failures": failures,
        "per_item": per_item,
    }


__all__ = ["GRADER_PROMPT", "Judge", "JudgeConfig", "parse_score", "score_judged"]
