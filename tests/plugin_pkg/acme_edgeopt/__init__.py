"""A tiny third-party edgeopt pass, registered and shipped through an entry point."""

from edgeopt.passes import PassResult, register_pass


@register_pass("acme.strip-docs")
def strip_docs(model, ctx):
    """Remove doc strings from every node (smaller files, no leaked comments)."""
    stripped = 0
    for node in model.walk():
        if node.doc_string:
            node.doc_string = ""
            stripped += 1
    return PassResult(modified=stripped > 0, stats={"docs_stripped": stripped})
