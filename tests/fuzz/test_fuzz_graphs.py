"""Property tests on random models (tests/fuzz/graphs.py): quantize raises only QcastErrors, leaves the user's model
alone, gives finite outputs near float, no quantized tensor reaches a float op or the reverse, explain() covers every
weighted layer, save/load round-trips bit for bit (tests/fuzz/properties.py says how each is checked)."""
import torch
from hypothesis import given

from tests.fuzz.graphs import build, graph_specs, random_spec
from tests.fuzz.properties import check_graph


@given(graph_specs())
def test_random_graphs_quantize_faithfully_or_raise_a_qcast_error(spec):
    check_graph(spec)


def test_the_generator_covers_its_vocabulary():
    """The first 300 graphs of the long run hold every block kind, every activation and every output structure, and
    each builds and runs in float (so a failure later is qcast's, not the generator's)."""
    from tests.fuzz import graphs

    seen_blocks, seen_acts, seen = set(), set(), set()
    for k in range(300):
        spec = random_spec(k)
        seen_blocks |= {b[0] for b in spec.blocks}
        seen_acts |= {a for b in spec.blocks for a in b if isinstance(a, str) and a in graphs.ACTS}
        seen |= {spec.kind, spec.head, spec.output}
    assert set(graphs.IMAGE_BLOCKS + graphs.TOKEN_BLOCKS + graphs.VIDEO_BLOCKS) <= seen_blocks
    assert set(graphs.ACTS) <= seen_acts
    assert {"image", "tokens", "video", *graphs.HEADS, *graphs.OUTPUTS} <= seen
    for k in range(0, 300, 30):
        spec = random_spec(k)
        with torch.no_grad():
            out = build(spec)(spec.make_input(0))
        assert out is not None
