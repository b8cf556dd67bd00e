"""Training: ONE skeleton and the trainers that plug into it.

  skeleton.py        open the run (lock, refuse / resume), build (network, EMA, AdamW, precision),
                     the step loop with hooks (log, periodic grids / evaluations, saves), the journaled save
  loop.py            run_loop: per-step seeds, learning rate, divergence stop, progress bar
  ema.py, processes.py, tracking.py    EMA; torchrun ranks; metrics.jsonl + TensorBoard
  diffusion.py       the diffusion trainer (train): losses.py, inputs.py, samples.py, model_card.py
  autoencoder.py     the autoencoder trainer (train_autoencoder): reconstruction.py
  classifier.py      the classifier trainer (train_classifier)
  finetune.py        the fine-tuning trainer (finetune, plan_finetune): LoRA or full, from a run or a
                     diffusers folder, with the diffusion trainer's step (diffusion.denoising_step);
                     finetune_data.py: instance images, DreamBooth class images
  resolve.py         options -> RunConfig (opens the data, asks the autoencoder for its latent shape)
  plan.py            what `diffusekit train` does before training: resume / overwrite checks
  estimate.py        the time per step and for the run, measured here before it trains
The run folders' config schemas and loaders live in diffusekit.store.
"""
from diffusekit.training.autoencoder import AutoencoderTrainResult, train_autoencoder
from diffusekit.training.classifier import ClassifierTrainResult, train_classifier
from diffusekit.training.diffusion import TrainResult, train
from diffusekit.training.loop import TrainingDiverged
from diffusekit.training.resolve import resolve_run_config

__all__ = ["AutoencoderTrainResult", "ClassifierTrainResult", "TrainResult", "TrainingDiverged", "resolve_run_config",
           "train", "train_autoencoder", "train_classifier"]
