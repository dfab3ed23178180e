"""PyTorch peers that jaxcap is compared with, where torchvision cannot be imported.

``resnet`` builds the torchvision ResNet architecture with torchvision's module
names (``conv1``, ``bn1``, ``layer1.0.conv1``, ``layer1.0.downsample.0``...), so
its ``state_dict`` has exactly the keys of a torchvision checkpoint.
Benchmarks and parity tests use torchvision itself when it imports.
"""

from __future__ import annotations

import torch
from torch import nn

STAGE_SIZES = {18: (2, 2, 2, 2), 34: (3, 4, 6, 3), 50: (3, 4, 6, 3), 101: (3, 4, 23, 3),
               152: (3, 8, 36, 3)}


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, inplanes, planes, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = _downsample(inplanes, planes, stride, self.expansion)

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + (self.downsample(x) if self.downsample is not None else x))


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, inplanes, planes, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)  # v1.5: stride here
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * 4)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = _downsample(inplanes, planes, stride, self.expansion)

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + (self.downsample(x) if self.downsample is not None else x))


def _downsample(inplanes, planes, stride, expansion):
    if stride == 1 and inplanes == planes * expansion:
        return None
    return nn.Sequential(nn.Conv2d(inplanes, planes * expansion, 1, stride, bias=False),
                         nn.BatchNorm2d(planes * expansion))


class ResNetFeatures(nn.Module):
    """torchvision's ResNet up to ``layer4`` (no pooling, no classifier)."""

    def __init__(self, depth: int = 50):
        super().__init__()
        block = Bottleneck if depth >= 50 else BasicBlock
        self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        inplanes = 64
        for index, (blocks, planes) in enumerate(zip(STAGE_SIZES[depth], (64, 128, 256, 512))):
            layers = []
            for b in range(blocks):
                layers.append(block(inplanes, planes, 2 if index > 0 and b == 0 else 1))
                inplanes = planes * block.expansion
            setattr(self, f"layer{index + 1}", nn.Sequential(*layers))

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))


def resnet(depth: int = 50) -> nn.Module:
    """torchvision's ``resnetD`` feature trunk when torchvision imports, else the twin above."""
    try:
        import torchvision
    except Exception:  # torchvision fails to import beside some torch builds
        return ResNetFeatures(depth)
    model = getattr(torchvision.models, f"resnet{depth}")(weights=None)
    # Same attribute names, so the trunk's forward runs on it; its state_dict
    # keeps torchvision's keys, classifier ``fc`` included.
    model.forward = ResNetFeatures.forward.__get__(model)
    return model


def randomize_batchnorm(model: nn.Module, seed: int = 0) -> None:
    """Non-trivial BatchNorm statistics and affine terms, so parity tests see them."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                size = module.num_features
                module.weight.copy_(torch.rand(size, generator=generator) + 0.5)
                module.bias.copy_(torch.randn(size, generator=generator) * 0.1)
                module.running_mean.copy_(torch.randn(size, generator=generator) * 0.1)
                module.running_var.copy_(torch.rand(size, generator=generator) + 0.5)


class TutorialDecoder(nn.Module):
    """Show, Attend and Tell's decoder as the best-known PyTorch tutorial writes it.

    Captions are sorted by length and each step runs only on the captions still
    going (the batch shrinks). With ``hoist=False`` the encoder-side attention
    projection is recomputed at every step, as the tutorial does; with
    ``hoist=True`` it is computed once per image, as jaxcap does.
    """

    def __init__(self, vocab_size, feature_dim=2048, embed_dim=50, hidden_dim=512,
                 attention_dim=512, dropout=0.5, hoist=False):
        super().__init__()
        self.hoist = hoist
        self.encoder_att = nn.Linear(feature_dim, attention_dim)
        self.decoder_att = nn.Linear(hidden_dim, attention_dim)
        self.full_att = nn.Linear(attention_dim, 1)
        self.embedding = nn.Embedding(vocab_size, embed_dim)
        self.dropout = nn.Dropout(dropout)
        self.lstm = nn.LSTMCell(embed_dim + feature_dim, hidden_dim)
        self.init_h = nn.Linear(feature_dim, hidden_dim)
        self.init_c = nn.Linear(feature_dim, hidden_dim)
        self.f_beta = nn.Linear(hidden_dim, feature_dim)
        self.fc = nn.Linear(hidden_dim, vocab_size)

    def forward(self, features, captions, lengths):
        batch = features.size(0)
        features = features.reshape(batch, -1, features.size(-1))
        lengths, order = lengths.sort(descending=True)
        features, captions = features[order], captions[order]
        embeddings = self.embedding(captions)
        mean = features.mean(dim=1)
        h, c = self.init_h(mean), self.init_c(mean)
        decode_lengths = (lengths - 1).tolist()
        steps = max(decode_lengths)
        scores = features.new_zeros(batch, steps, self.fc.out_features)
        alphas = features.new_zeros(batch, steps, features.size(1))
        projected = self.encoder_att(features) if self.hoist else None
        for t in range(steps):
            n = sum(length > t for length in decode_lengths)
            att1 = projected[:n] if self.hoist else self.encoder_att(features[:n])
            att = self.full_att(torch.relu(att1 + self.decoder_att(h[:n]).unsqueeze(1))).squeeze(2)
            alpha = torch.softmax(att, dim=1)
            context = (features[:n] * alpha.unsqueeze(2)).sum(dim=1)
            context = torch.sigmoid(self.f_beta(h[:n])) * context
            h, c = self.lstm(torch.cat([embeddings[:n, t], context], dim=1), (h[:n], c[:n]))
            scores[:n, t] = self.fc(self.dropout(h))
            alphas[:n, t] = alpha
        return scores, captions, decode_lengths, alphas


def tutorial_loss(scores, captions, decode_lengths, alphas, alpha_c=1.0):
    """Cross-entropy over the real tokens plus the doubly stochastic penalty."""
    from torch.nn.utils.rnn import pack_padded_sequence

    targets = captions[:, 1:]
    packed_scores = pack_padded_sequence(scores, decode_lengths, batch_first=True).data
    packed_targets = pack_padded_sequence(targets, decode_lengths, batch_first=True).data
    loss = nn.functional.cross_entropy(packed_scores, packed_targets)
    return loss + alpha_c * ((1.0 - alphas.sum(dim=1)) ** 2).mean()


def batched_beam_search(decoder: TutorialDecoder, features, k: int, max_length: int,
                        masked_ids: tuple[int, ...], start_id: int, end_id: int, pad_id: int):
    """Beam search for a batch of images at once, as the research codebases write it.

    What a user who outgrew the tutorial's per-image search would pick: all
    images and their beams step together as one ``(N * k)``-row batch, the
    encoder projection is computed once per image and, like the grid itself,
    shared by the image's beams (never copied per beam). Same rules as jaxcap's
    ``beam_search``: ranking by summed log-probability, finished beams carry
    forward at no cost, the best ended hypothesis wins (else the best
    unfinished one), and the loop stops when every beam has ended. Returns the
    token rows ``(N, max_length)`` (``<start>`` first, ``<pad>`` after the end).
    """
    import torch

    n = features.size(0)
    regions = features.reshape(n, -1, features.size(-1))  # (N, P, D)
    projected = decoder.encoder_att(regions)  # (N, P, A), once per image
    mean = regions.mean(dim=1)
    h = decoder.init_h(mean).repeat_interleave(k, 0)  # (N*k, H)
    c = decoder.init_c(mean).repeat_interleave(k, 0)
    vocab = decoder.fc.out_features
    on = dict(device=features.device)  # wherever the features are (CPU or a GPU)
    tokens = torch.full((n, k, max_length), pad_id, dtype=torch.long, **on)
    tokens[:, :, 0] = start_id
    scores = torch.full((n, k), -float("inf"), **on)
    scores[:, 0] = 0.0
    done = torch.zeros(n, k, dtype=torch.bool, **on)
    pad_only = torch.full((vocab,), -float("inf"), **on)
    pad_only[pad_id] = 0.0
    rows = torch.arange(n, **on)[:, None]
    for t in range(1, max_length):
        query = decoder.decoder_att(h).view(n, k, 1, -1)
        att = decoder.full_att(torch.relu(projected[:, None] + query)).squeeze(-1)  # (N, k, P)
        alpha = torch.softmax(att, dim=-1)
        context = torch.einsum("nkp,npd->nkd", alpha, regions).reshape(n * k, -1)
        context = torch.sigmoid(decoder.f_beta(h)) * context
        words = decoder.embedding(tokens[:, :, t - 1].reshape(-1))
        h, c = decoder.lstm(torch.cat([words, context], dim=1), (h, c))
        logp = torch.log_softmax(decoder.fc(h), dim=-1).view(n, k, vocab)
        logp[..., list(masked_ids)] = -float("inf")
        logp = torch.where(done[..., None], pad_only, logp)
        top, flat = (scores[..., None] + logp).view(n, k * vocab).topk(k, dim=1)
        source, word = flat // vocab, flat % vocab  # (N, k)
        tokens = tokens[rows, source]
        tokens[:, :, t] = word
        done = done[rows, source] | (word == end_id)
        scores = top
        pick = (rows * k + source).reshape(-1)
        h, c = h[pick], c[pick]
        if bool(done.all()):
            break
    ranked = torch.where(done | ~done.any(dim=1, keepdim=True), scores,
                         torch.full_like(scores, -float("inf")))
    return tokens[torch.arange(n, **on), ranked.argmax(dim=1)]
