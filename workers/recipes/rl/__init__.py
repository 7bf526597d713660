"""Online RL (PPO now; reinforcement fine-tuning with graders next) as a package of small parts.

- :mod:`~workers.recipes.rl.core` — the pure math (advantages, losses, KL, controllers, alarms),
  each function with known-answer tests;
- :mod:`~workers.recipes.rl.models` — the roles (policy, value, reference, reward) on one copy of
  the base weights, and their checkpoint files;
- :mod:`~workers.recipes.rl.engine` — rollouts, rewards, advantage estimators and updates, with no
  database or object store (``bench/`` runs it as the recipes do);
- :mod:`~workers.recipes.rl.ppo` — the PPO recipe on the shared training loop.
"""
