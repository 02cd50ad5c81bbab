"""Programmatic rewards for PPO tests, behind the reward model's interface (`ppo.reward=tests.ppo_rewards:NAME`):
each takes the answers' texts and the prompts' reference answers."""


def e_fraction(texts: list[str], references: list[str | None]) -> list[float]:
    """The share of an answer's characters that are the letter e: a property a policy can learn to increase."""
    return [10 * t.count("e") / max(1, len(t)) for t in texts]
