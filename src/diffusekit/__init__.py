"""diffusekit: denoising diffusion models to train, sample and edit."""
