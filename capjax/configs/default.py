"""The seed recipe: ResNet50 + 256-unit LSTM on Flickr8k at 224 px.

Prepare the data once, then train (see README for the accepted download layouts):
  python launch.py --mode=prepare --config=configs/default.py --config.data.manual_dir=/path/to/flickr8k
  python launch.py --config=configs/default.py --workdir=/tmp/capjax_flickr8k
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.seed = 0

  config.data = data = ml_collections.ConfigDict()
  data.name = 'flickr8k'  # flickr8k | flickr30k | coco | shapes (the built-in demo data)
  data.data_dir = '~/capjax_data'  # where prepared array_record files live
  data.manual_dir = ''  # where the downloaded dataset was unpacked (prepare mode)
  data.layout = 'auto'  # auto | flickr8k_original | kaggle_csv | karpathy_json
  data.image_size = 224
  data.max_caption_len = 24  # tokens including <START> and <END>; longer captions are truncated
  data.min_word_count = 5
  data.captions_per_image = 5  # captions per image that an epoch covers
  # Captions per training example: the encoder (and augmentation) runs once per image and the decoder on
  # all K captions ("seq_per_img"); train.batch_size counts images. 1: one (image, caption) pair per
  # example, captions_per_image examples per image and epoch.
  data.seq_per_img = 5
  data.random_caption = False  # True: one example per image per epoch, its captions drawn at random
  # >0: keep decoded images (shorter side this many pixels) in memory after the first epoch.
  data.cache_images_min_side = 0
  data.read_threads = 4  # grain threads decoding batches in each process
  data.prefetch_batches = 4  # batches decoded ahead of the step (grain's default of 500 is GBs)
  data.num_workers = 0  # grain worker processes (fixed for a run: iterator state depends on it)
  # The size images are stored at for device augmentation / device-resident data (0: image_size); a
  # little larger than image_size leaves room for the random crop without upsampling.
  data.store_size = 0
  # The whole training split as one uint8 array on the devices (indexed in the step; the host sends only
  # indices and tokens), when it fits in device_resident_max_gb (and a third of a device's memory).
  data.device_resident = False
  data.device_resident_max_gb = 4.0
  # The demo dataset's size (only for name='shapes').
  data.shapes_num_train = 1500
  data.shapes_num_validation = 200
  data.shapes_num_test = 200
  data.shapes_image_size = 96
  data.shapes_object_scale = 1.0  # drawn object size relative to shapes.SIZES

  data.augment = augment = ml_collections.ConfigDict()
  augment.enabled = True
  augment.crop_scale = (0.8, 1.0)
  augment.crop_ratio = (3 / 4, 4 / 3)
  augment.flip_prob = 0.5
  augment.brightness = 0.2
  augment.contrast = 0.2
  augment.rotation_degrees = 5.0
  augment.on_device = False  # True: the jitted step augments (capjax/device_augment.py), not PIL

  config.model = model = ml_collections.ConfigDict()
  model.stage_sizes = (3, 4, 6, 3)  # ResNet50
  model.width = 64
  model.embed_dim = 256
  model.hidden_size = 256
  model.lstm_unroll = 1
  # 'seed': one pooled image vector starts the LSTM (Show and Tell). 'attention': the LSTM attends over
  # the trunk's spatial grid at every word (Show, Attend and Tell; capjax/models/attention.py).
  model.decoder = 'seed'
  model.attention_dim = 256  # the paper's code: 512 (VGG features); 256 matches the seed's scale
  model.attention_grid = 0  # cells per side the trunk map is resized to; 0: as is (7 at 224 px)
  model.attention_dropout = 0.5  # before the readout, as the paper
  model.attention_regularizer = 1.0  # lambda of the doubly stochastic penalty (the paper's code: 1)
  # Each annotation also carries its cell's centre (x, y): what the decoder attends to then says where it
  # is, so a caption's "on the left" can come from where it looked (configs/demo_attention.py).
  model.attention_cell_positions = False
  # The attention's query also reads the word just fed: after "a red" it can look for what is red before
  # naming its shape (Show, Attend and Tell's query is the state from before that word was read).
  model.attention_query_word = False
  # Show, Attend and Tell's deep output: the readout also reads the word just fed and the attended context
  # (with attention_cell_positions: where it looked), not only the LSTM's state.
  model.attention_deep_output = False
  # Location-aware attention: each cell's score also reads its weight at the previous word and its
  # coverage so far, so attention can stay on an object while describing it and move on afterwards.
  model.attention_location = False
  model.dtype = 'float32'  # 'bfloat16': bf16 compute, float32 params
  # Weight of the auxiliary word-presence loss: a head on the image vector (attention: the mean annotation)
  # predicts which words the image's captions use (capjax/models/captioner.py). 0: caption loss alone.
  # Cross-entropy training only: SCST follows its policy gradient alone and leaves the head as it is.
  model.word_loss_weight = 0.0
  # 'mean': the head reads the pooled vector (attention: the mean annotation). 'cells' (attention only):
  # it reads every cell and a word's logit is its highest cell's, so single cells must show the words.
  model.word_loss_pooling = 'mean'
  # train: fine-tune everything | frozen: trunk fixed, BN in inference mode, only projection+decoder
  # learn | cached: like frozen, but pooled trunk features are extracted once into the workdir and the
  # decoder trains on them (fastest; no image augmentation in this mode).
  model.encoder_mode = 'train'
  model.reextract_features = False  # cached mode: extract the features again even if present
  # A torchvision ResNet50 state dict (.pth/.safetensors) to start the trunk from; '' = random init.
  model.encoder_init = ''

  config.train = train = ml_collections.ConfigDict()
  train.batch_size = 64  # global, over all devices and hosts
  train.num_epochs = 30
  train.learning_rate = 1e-3
  train.warmup_epochs = 1.0
  train.end_learning_rate_factor = 0.01  # cosine decays to lr * this
  train.weight_decay = 1e-4
  train.grad_clip_norm = 5.0
  # Fine-tuning warm-up (encoder_mode=train): trunk frozen for this many epochs, then it learns at
  # learning_rate * encoder_lr_factor (optax.multi_transform).
  train.frozen_epochs = 0.0
  train.encoder_lr_factor = 1.0
  train.log_every_steps = 50
  train.checkpoint_every_steps = 0  # 0: checkpoint at each epoch end only
  train.keep_checkpoints = 2
  train.keep_best_checkpoints = 1
  train.best_metric = 'CIDEr'  # chooses the 'best' checkpoint; val_loss also works (best_mode='min')
  train.best_mode = 'max'
  train.metrics_every_epochs = 1  # greedy-decode the validation split for BLEU-4/CIDEr; 0: never
  train.metrics_num_images = 1000  # cap on validation images decoded for metrics
  train.eval_batch_size = 64
  train.max_steps = 0  # >0: stop after this many steps (smoke tests)
  # A NaN/Inf loss or gradient norm stops the run (nothing non-finite is ever saved); >0: first skip up
  # to this many such steps in all (the update is dropped, the step counter advances).
  train.skip_nonfinite_steps = 0
  # What the run optimises. 'xent': cross-entropy of the reference captions (teacher forcing). 'scst':
  # self-critical sequence training (capjax/scst.py): sample captions, reward each with its CIDEr-D against
  # the image's training references, follow the policy gradient with a baseline. A second stage, started
  # from a cross-entropy workdir (init_from) at a lower learning rate: see configs/demo_scst.py.
  train.objective = 'xent'
  # A workdir whose best checkpoint (its latest without one) gives a NEW run its params and batch_stats;
  # the optimizer, step counter and schedule start fresh. Ignored once this workdir has a checkpoint.
  train.init_from = ''
  train.scst_samples = 5  # sampled captions per image and step (the encoder runs once for all of them)
  # 'greedy': a sample's baseline is the reward of its image's greedy caption (Rennie et al. 2017);
  # 'mean': the mean reward of the image's other samples (needs scst_samples >= 2).
  train.scst_baseline = 'greedy'
  train.scst_temperature = 1.0  # samples are drawn from softmax(logits / T)
  # Score <END> as a word in the reward (self-critical.pytorch): a caption is rewarded for ending the way
  # the references end, so SCST does not learn cut-off endings ("... with a").
  train.scst_reward_end = True
  return config
