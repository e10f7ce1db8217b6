"""The experiments' recipes resolve to valid runs of registered learners."""

import pytest

import metalens
from metalens.experiments.recipes import ADAPTATION_STEPS, TOUR


@pytest.mark.parametrize("name", list(TOUR))
def test_tour_recipes_resolve(name):
    recipe = TOUR[name]
    cfg = metalens.RunConfig.resolve(recipe.task, name, recipe.task_options, recipe.learner_options, recipe.train)
    assert cfg.learner == name and cfg.task == recipe.task


def test_every_learner_has_a_tour_recipe_and_adaptation_options_exist():
    assert set(TOUR) == set(metalens.LEARNERS.names())
    assert {TOUR[n].task for n in ("cnp", "lnp", "anp")} == {"gp"}
    assert {TOUR[n].task for n in ("protonet", "matching")} == {"clusters"}
    for name, option in ADAPTATION_STEPS.items():
        assert option in metalens.config.field_docs(metalens.LEARNERS[name].cls.Config)
