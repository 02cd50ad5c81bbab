"""What the training stages (pretrain, sft, rm, ppo) share: data loading, and later engine setup, the training
loop, checkpoint/resume and schedules."""
