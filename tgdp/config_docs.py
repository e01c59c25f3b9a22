"""One line per config field: what it means (``python -m tgdp.train --print-config`` prints them).

Kept apart from :mod:`tgdp.configs` so that the schema stays readable; a test checks that every
field of :class:`tgdp.configs.Config` has a line here (a new field needs one), and that no line
describes a field that no longer exists. Type and default are printed from the schema itself.
"""

from __future__ import annotations

__all__ = ["DOCS", "SECTIONS"]

SECTIONS = {
    "model": "CAV-MAE Sync backbone (ViT encoders per modality, joint layers, MAE decoder)",
    "masking": "the two views of each step: random reconstruction masks, teacher-guided contrastive masks",
    "loss": "loss weights and the details of the reconstruction, distillation and contrastive terms",
    "teacher": "the EMA teacher that scores patches for the contrastive view and is distilled from",
    "data": "shards, decoding, audio features and the training data source",
    "train": "optimisation, precision, parallelism, checkpoints and logging of a run",
    "eval": "zero-shot retrieval (python -m tgdp.eval retrieval, and the demo report)",
    "probe": "the attention probe on frozen features (python -m tgdp.eval probe; supplement Table 1)",
}

DOCS = {
    "preset": "the preset the other values start from (paper = the published recipe, tgdp = our improved "
              "recipe, tiny = tgdp at CPU size)",
    # model
    "model.img_size": "video frame side in pixels (frames are resized and centre-cropped to it)",
    "model.patch_size": "side of the square patches of both modalities, in pixels / fbank bins",
    "model.in_chans": "colour channels of a video frame",
    "model.audio_length": "fbank frames per audio window (time axis); a multiple of patch_size",
    "model.n_mels": "log-Mel bins (frequency axis); a multiple of patch_size",
    "model.embed_dim": "token width of the encoders",
    "model.depth": "encoder depth in total: modality-specific layers plus joint layers",
    "model.modality_specific_depth": "layers each modality runs alone before the joint layers",
    "model.num_heads": "attention heads of the encoder layers (divides embed_dim)",
    "model.mlp_ratio": "MLP hidden width as a multiple of embed_dim",
    "model.decoder_embed_dim": "token width of the MAE decoder",
    "model.decoder_depth": "layers of the MAE decoder",
    "model.decoder_num_heads": "attention heads of the decoder layers (divides decoder_embed_dim)",
    "model.num_register_tokens": "register tokens per modality, appended after the patches and "
                                 "dropped before the joint layers",
    "model.ln_eps": "LayerNorm epsilon (the official CAV-MAE value is 1e-5, not MAE's 1e-6)",
    "model.attn_backend": "attention of the fast model: auto = FlashAttention on CUDA when importable, "
                          "else SDPA",
    # masking
    "masking.rec_ratio": "fraction of patches hidden in the reconstruction view (random, both modalities)",
    "masking.con_ratio": "fraction of patches hidden in the contrastive view (chosen from the teacher scores)",
    "masking.guide": "how the contrastive view picks visible patches from the teacher scores "
                     "(distinct, gumbel sampling, or random = no guidance)",
    "masking.gumbel_tau": "guide = gumbel: patches are drawn from softmax(raw scores / tau), the official prob mode",
    "masking.score_direction": "which teacher attention is the patch score: patch queries to the CLS key "
                               "(official) or the CLS query to patch keys",
    "masking.renormalize_scores": "divide the scores by their sum over the patches (guide = distinct only, "
                                  "where it cannot change the top-k)",
    "masking.official_compat": "reproduce the official bug: the teacher ranks positions of a randomly "
                               "shuffled sequence",
    "masking.dual_path": "false = the CAV-MAE Sync single pass (ablation baseline): contrastive loss on the "
                         "reconstruction view's CLS, no second view",
    # loss
    "loss.w_rec": "weight of the reconstruction (MAE) loss, lambda_1",
    "loss.w_dis": "weight of the distillation loss to the teacher's globals, lambda_2",
    "loss.w_con": "weight of the contrastive (InfoNCE) loss, lambda_3",
    "loss.norm_pix_loss": "reconstruct per-patch normalised pixels / fbank values (unbiased var + 1e-6)",
    "loss.temperature": "fixed softmax temperature of the contrastive loss",
    "loss.symmetric": "contrastive loss in both directions (false = official: video to audio only)",
    "loss.gather": "all-gather contrastive negatives across ranks (with gradients) when distributed",
    "loss.dis_normalize": "L2-normalise student and teacher globals before the distillation distance",
    "loss.rec_grad_to_cls": "let the reconstruction loss train the CLS tokens through attention (official)",
    # teacher
    "teacher.momentum": "EMA momentum of the teacher weights (at the start, for the cosine schedule)",
    "teacher.schedule": "momentum over the run: constant, or cosine from momentum to momentum_end",
    "teacher.momentum_end": "final momentum of the cosine schedule",
    # data
    "data.root": "training shard folder (manifest.json, made by python -m tgdp.prepare); 'random' = "
                 "a noise source for tests; required unless --demo",
    "data.demo_dir": "where --demo generates (once) and finds the embedded demo set",
    "data.loader": "shard reader: auto = DALI when importable and on CUDA, else the torch loader",
    "data.num_workers": "torch loader worker processes",
    "data.frames_per_clip": "frames stored per clip; training draws one per step, retrieval uses all",
    "data.sample_rate": "audio sample rate in Hz the clips are decoded at",
    "data.fbank_frames": "fbank frames kept per clip (padded or cut) before the windows are taken",
    "data.fbank_mean": "mean subtracted from the log-Mel fbank (CAV-MAE AudioSet statistic)",
    "data.fbank_std": "the centred fbank is divided by this (CAV-MAE AudioSet statistic)",
    "data.pad": "padding of short audio: floor = the log floor, zero = official (log-Mel 0, a bug)",
    "data.window": "where a frame's audio window sits: frame_time = centred on the frame's time, "
                   "official = 64 frames per index (drifts 0.24 s)",
    "data.time_shift": "random circular shift of the audio window, fraction of its length (training only)",
    "data.eval_frame": "frame index used for single-frame evaluation and plots",
    "data.shuffle_buffer": "samples held by the torch loader's shuffle buffer",
    "data.cache_frames": "K > 0: decode the training split once and keep K frames per clip in memory "
                         "(small sets such as the demo); 0 = stream the shards",
    "data.host_masks": "draw the reconstruction masks on the host while batches are assembled, so audio "
                       "padding is never visible (torch loader, cache and noise sources)",
    "data.channels": "audio channel the shards were prepared with: first (the official rule) or mix (mean of "
                     "all channels); must match python -m tgdp.prepare --channels",
    "data.dali_threads": "CPU threads of the DALI pipeline per rank (DALI decodes FLAC on the CPU only); "
                         "0 = the CPUs this process may use / ranks per node, at least 2",
    # train
    "train.steps": "optimizer steps of the run; 0 = epochs x samples / batch_size",
    "train.epochs": "passes over the training split when train.steps is 0",
    "train.batch_size": "global batch (split evenly over the ranks)",
    "train.lr": "peak learning rate after warmup",
    "train.min_lr_ratio": "floor of the cosine decay as a fraction of lr",
    "train.warmup_frac": "fraction of all steps spent in linear warmup",
    "train.weight_decay": "weight decay: added to the gradient (adam, coupled L2) or decoupled (adamw)",
    "train.betas": "Adam (beta1, beta2); on the command line: --train.betas 0.9,0.95",
    "train.optimizer": "adam = Adam with coupled L2 (the official scripts), adamw = decoupled decay; both fused",
    "train.grad_clip": "clip the gradient norm to this value; 0 = no clipping (official)",
    "train.precision": "auto = bf16 autocast on CUDA and fp32 on CPU, or force fp32 / bf16",
    "train.compile": "torch.compile the training forward and backward",
    "train.cuda_graphs": "CUDA graphs over the compiled step (needs train.compile and CUDA)",
    "train.dist": "data parallelism under torchrun: ddp, or fsdp2 (sharded parameters)",
    "train.fsdp_bf16": "fsdp2 only: bf16 parameters and gradient reduction",
    "train.seed": "seed of weights, masks and data order (runs are reproducible)",
    "train.out_dir": "run folder: metrics, TensorBoard, checkpoints/, summary.json",
    "train.ckpt_every": "write a checkpoint every this many steps (and at the end)",
    "train.keep_last": "checkpoints kept in out_dir/checkpoints (older ones are deleted)",
    "train.log_every": "log metrics every this many steps (the only host syncs of the loop)",
    "train.resume": "continue the run in out_dir exactly, from its newest intact checkpoint",
    "train.overwrite": "start a fresh run in an out_dir that holds another run's files, after moving them "
                       "to out_dir/replaced/ (never deleted)",
    "train.init": "start from this checkpoint's weights: an official one, or tgdp's (e.g. from "
                  "python -m tgdp.convert import)",
    "train.model_impl": "student implementation: auto = the fast packed model where supported, "
                        "else the reference",
    # eval
    "eval.retrieval_videos": "videos evaluated in retrieval (at most; the first ones of the split)",
    "eval.batch_videos": "videos per retrieval batch (each brings all its frames)",
    "eval.chunk": "rows of the similarity matrix computed at once",
    # probe
    "probe.head": "official = the released CAVMAEFT head (concat of the pre-joint CLS per frame), "
                  "tokens = our earlier head on the retrieval globals",
    "probe.modality": "frozen features the probe reads: both, audio or video",
    "probe.task": "multiclass (CE, top-1; VGGSound) or multilabel (BCE, mAP; AudioSet)",
    "probe.epochs": "training epochs of the probe",
    "probe.batch_size": "clips per probe batch",
    "probe.lr": "peak learning rate of the probe",
    "probe.warmup_epochs": "linear warmup (per step) before the cosine decay, in epochs",
    "probe.min_lr_ratio": "floor of the cosine decay as a fraction of lr",
    "probe.optimizer": "adam (coupled L2, the CAV-MAE fine-tuning code) or adamw",
    "probe.weight_decay": "weight decay of the probe optimizer",
    "probe.betas": "(beta1, beta2) of the probe optimizer",
    "probe.class_balanced": "draw training clips with replacement, weighted by the inverse counts of their labels",
    "probe.mixup": "probability of mixing a clip with a random training clip (features and targets)",
    "probe.mixup_beta": "mixup weights lam ~ Beta(mixup_beta, mixup_beta)",
    "probe.label_smooth": "label smoothing of the training targets",
    "probe.wa": "report the average of the weights of epochs wa_start..wa_end",
    "probe.wa_start": "first epoch (1-based) of the weight average",
    "probe.wa_end": "last epoch of the weight average; 0 = the last epoch",
    "probe.select": "the reported model: final (or its weight average), or val = the best on a split carved "
                    "from the training clips; never chosen on the evaluation split",
    "probe.val_frac": "share of the training clips carved off when select = val",
    "probe.depth": "transformer blocks of the probe head",
    "probe.num_heads": "attention heads of the probe head",
    "probe.seed": "seed of the probe head, its sampling and the splits",
}
