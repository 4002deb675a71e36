"""The three methods, one file each: grpo.py, sgrpo.py, tspmo.py (DESIGN.md, "The math").

Each file has two levels a reader can take apart:
- `accumulate_gradients(model, prefix, completions, rewards, ...)`: the loss of one group, backpropagated
  into the LoRA gradients (no optimizer step);
- `train_step(model, draws, sample, score, optimizer_step, ...)`: the method's whole procedure for one
  training step, calling `optimizer_step` once per round of groups.

train.py supplies the three callables, so that nothing here knows about files, ranks or devices:
- `sample(draw, root, max_new_tokens) -> completions`: G continuations of the token list `root`;
- `score(draw, answer_tokens) -> reward`: the reward of an answer (the tokens after the prompt);
- `optimizer_step(has_signal, loss)`: one AdamW step over the accumulated gradients, or none when no
  group of the round, on any rank, carried a signal.
"""

from dataclasses import dataclass, field


@dataclass
class GroupStats:
    """What one group's loss did: its value, how many terms it averages, how many it computed."""
    loss: float = 0.0
    n_loss_terms: int = 0  # tokens (GRPO, S-GRPO) or |U| (T-SPMO)
    n_computed: int = 0  # log-probs evaluated: every kept token, or T-SPMO's branch-point pairs
    has_signal: bool = False  # a reward difference: the group moves the weights


@dataclass
class StepStats:
    """One training step on this rank: the fresh groups' rewards and the sums of every group's stats."""
    rewards: list[float] = field(default_factory=list)
    loss: float = 0.0
    n_loss_terms: int = 0
    n_computed: int = 0

    def add(self, group: GroupStats):
        self.loss += group.loss
        self.n_loss_terms += group.n_loss_terms
        self.n_computed += group.n_computed
