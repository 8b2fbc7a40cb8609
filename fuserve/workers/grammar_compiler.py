"""Grammars compiled off the engine step, and cached by their text.

    submit(grammar) -> Future[LLMatcher]   a matcher in its start state: the sequence takes a deep copy

Compiling runs on a small thread pool: llguidance drops the GIL while it builds a grammar (about 1 ms
for a small JSON schema, up to a second for a huge one), so the engine loop keeps stepping the other
requests meanwhile, and a request waits for its own grammar only. llguidance's view of the tokenizer
(about 0.3 s for a 49k vocabulary) is built on the first compile, on the pool as well, so an engine
that never sees a grammar never pays for it.

The cache holds futures, so requests with the same grammar that arrive while it compiles share the
one compile; it keeps `cache_size` grammars (least recently used out). A grammar that fails to
compile is cached as well: the same bad schema fails at once the next time.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor

import llguidance

from fuserve.workers.tokenizer import Tokenizer


class GrammarError(ValueError):
    """A grammar llguidance refused; the message is llguidance's, which names the problem."""


def llguidance_tokenizer(tokenizer: Tokenizer, vocab_size: int) -> llguidance.LLTokenizer:
    """llguidance's view of the model's tokenizer. `vocab_size` is the model's (its logits' width),
    which may exceed the tokenizer's when the embedding is padded; the padding tokens are never allowed."""
    eos = sorted(tokenizer.eos_token_ids) or None
    return llguidance.LLTokenizer(tokenizer.backend.to_str(), n_vocab=vocab_size, eos_token=eos)


class GrammarCompiler:
    def __init__(self, tokenizer: Tokenizer, vocab_size: int, cache_size: int, num_threads: int) -> None:
        self.tokenizer = tokenizer
        self.vocab_size = max(vocab_size, tokenizer.vocab_size)  # the bitmask's width, in tokens
        self.cache_size = cache_size
        self._pool = ThreadPoolExecutor(num_threads, thread_name_prefix="grammar-compile")
        self._cache: OrderedDict[str, Future] = OrderedDict()
        self._lock = threading.Lock()
        self._lltok: llguidance.LLTokenizer | None = None
        self.num_compiled = 0

    def submit(self, grammar: str) -> Future:
        """The future of a start-state matcher for `grammar` (cached, or compiling on the pool)."""
        future = self._cache.get(grammar)
        if future is not None:
            self._cache.move_to_end(grammar)
            return future
        future = self._pool.submit(self._compile, grammar)
        if self.cache_size > 0:
            self._cache[grammar] = future
            while len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
        return future

    def llg_tokenizer(self) -> llguidance.LLTokenizer:
        with self._lock:  # the pool's threads build it once
            if self._lltok is None:
                self._lltok = llguidance_tokenizer(self.tokenizer, self.vocab_size)
            return self._lltok

    def _compile(self, grammar: str) -> llguidance.LLMatcher:
        matcher = llguidance.LLMatcher(self.llg_tokenizer(), grammar, log_level=0)
        if matcher.is_error():
            raise GrammarError(f"the grammar does not compile: {matcher.get_error()}")
        self.num_compiled += 1
        return matcher

    def shutdown(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
