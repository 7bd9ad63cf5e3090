import amqpkit


def test_all_is_sorted() -> None:
    assert amqpkit.__all__ == sorted(amqpkit.__all__)


def test_all_matches_public_names() -> None:
    public = {
        name
        for name, value in vars(amqpkit).items()
        if not name.startswith("_") and not isinstance(value, type(amqpkit))
    }
    assert set(amqpkit.__all__) - {"__version__"} == public


def test_every_export_exists() -> None:
    for name in amqpkit.__all__:
        assert hasattr(amqpkit, name), name
