"""Shared fixtures. Most tests use a tiny random model of the same architecture
(2 blocks, width 64) with the real tokenizer, saved once per session as a
Hugging Face folder so that stage scripts can be run on it with --model.
A few integration tests use the real embedded model (marked `real`)."""
import os
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import model as M  # noqa: E402
import weights as W  # noqa: E402

TINY = dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16, hidden_dim=128, max_seq_len=2048)


@pytest.fixture(scope="session")
def real_model():
    """The embedded SmolLM2-135M-Instruct, fp32 on the CPU (loaded once)."""
    return M.load_model(None, "cpu", torch.float32)


def make_tiny(tokenizer, seed=0, **overrides):
    """A random ChatModel of the same architecture, small enough for fast tests."""
    torch.manual_seed(seed)
    cfg = M.Config(vocab_size=tokenizer.vocab_size, **{**TINY, **overrides})
    model = M.ChatModel(cfg).eval()
    for p in model.parameters():        # larger weights than the default init: sharper, more varied logits
        if p.dim() > 1:
            torch.nn.init.normal_(p, std=0.2)
    model.tokenizer = tokenizer
    return model


@pytest.fixture(scope="session")
def tokenizer(real_model):
    return real_model.tokenizer


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tokenizer):
    """A tiny random model saved as a Hugging Face folder: pass it as --model."""
    folder = str(tmp_path_factory.mktemp("tiny") / "model")
    W.save_model(make_tiny(tokenizer), folder)
    return folder


@pytest.fixture
def tiny_model(tiny_model_dir):
    """A fresh copy of the tiny model (tests may train it)."""
    return M.load_model(tiny_model_dir, "cpu")
