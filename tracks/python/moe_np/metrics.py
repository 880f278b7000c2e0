"""Static metrics of a source tree (CONTRACT §10): gzip bytes, SLOC, function count."""

import ast
import gzip
import io
import tokenize
from pathlib import Path

CODE_TOKENS = {tokenize.COMMENT, tokenize.NL, tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT,
               tokenize.ENDMARKER, tokenize.ENCODING}


def docstring_lines(tree):
    """Line numbers covered by docstrings (module, class and function), which count as comments."""
    lines = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(getattr(first, "value", None), ast.Constant) \
                    and isinstance(first.value.value, str):
                lines.update(range(first.lineno, first.end_lineno + 1))
    return lines


def sloc(text):
    """Lines holding code: not blank, not only a comment, not part of a docstring."""
    docs = docstring_lines(ast.parse(text))
    code = set()
    for tok in tokenize.generate_tokens(io.StringIO(text).readline):
        if tok.type not in CODE_TOKENS:
            code.update(range(tok.start[0], tok.end[0] + 1))
    return len(code - docs)


def static_metrics(directory):
    """{source_gzip_bytes, sloc, function_count, files} of every .py file under `directory`."""
    files = sorted(Path(directory).rglob("*.py"))
    texts = [f.read_text() for f in files]
    everything = "".join(texts)
    functions = sum(isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))
                    for t in texts for n in ast.walk(ast.parse(t)))
    return {"source_gzip_bytes": len(gzip.compress(everything.encode(), mtime=0)),
            "sloc": sum(sloc(t) for t in texts), "function_count": functions, "files": len(files)}
