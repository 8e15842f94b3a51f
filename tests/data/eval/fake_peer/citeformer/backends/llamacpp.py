"""A stand-in LlamaCppBackend: answers from the prompt and sources without a model."""

from citeformer.core import Policy


class LlamaCppBackend:
    def __init__(self, model_path, n_ctx, n_gpu_layers):
        print("llama.cpp chatter on stdout must not reach the protocol")
        self.model_path = model_path

    def generate(self, prompt, sources, policy, max_new_tokens, temperature):
        assert policy is Policy.REQUIRED
        assert temperature == 0.0
        if "FAIL" in prompt:
            raise RuntimeError("the fake peer was asked to fail")
        last = len(sources)
        return f"{sources[0].metadata['title']} answers in {max_new_tokens} tokens [1][{last}]."
