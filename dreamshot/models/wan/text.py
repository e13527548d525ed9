"""umT5 embeddings of storyboard texts (DESIGN §2 "Text"): every role prompt and shot annotation alone."""

from __future__ import annotations

import torch


@torch.no_grad()
def encode_texts(text_encoder, tokenizer, texts: list[list[str]], text_len: int) -> torch.Tensor:
    """B rows of F texts -> (B, F, L, D) embeddings, L = `text_len`, in the encoder's dtype.

    All B·F texts run as one encoder batch, each padded / truncated to L tokens and masked, so a text's
    embedding does not depend on its neighbours. As in diffusers' WanPipeline, the embeddings after each
    text's last real token are set to zero: Wan was trained with its cross-attention attending to these zero
    rows (keys are never masked), so they must be zeros, not the encoder's outputs at padding positions.
    Autocast is off (as for the VAE, `latents.py`): a text is embedded in training as it is at sampling.
    """
    lengths = {len(row) for row in texts}
    if len(lengths) != 1:
        raise ValueError(f"every row of texts must have the same number of texts, got lengths {sorted(lengths)}")
    flat = [text for row in texts for text in row]
    tokens = tokenizer(flat, padding="max_length", max_length=text_len, truncation=True, return_tensors="pt")
    device = text_encoder.device
    mask = tokens.attention_mask.to(device)
    with torch.autocast(device.type, enabled=False):
        hidden = text_encoder(input_ids=tokens.input_ids.to(device), attention_mask=mask).last_hidden_state
    hidden = hidden.masked_fill(~mask.bool().unsqueeze(-1), 0.0)
    return hidden.unflatten(0, (len(texts), lengths.pop()))
