"""Training recipes on TRL: adapter-only DPO and SFT (CLM / InRa) with their baselines, and
TrRa distillation toward a λ-mixed teacher. Each recipe is `train_<name>(...)` plus a config
dataclass that extends TRL's."""
