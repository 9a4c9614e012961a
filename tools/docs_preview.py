#!/usr/bin/env python3
"""Render the documentation site's pages to HTML without Quarto.

    .venv/bin/python tools/docs_preview.py            # writes _preview/*.html, open _preview/index.html

The real site is built by Quarto (`nbdev_docs`, in the deploy workflow). Quarto can't be installed on every machine,
so this script shows every notebook page much as the site does:

1. each notebook is run through nbdev's own docs processors (`nbdev.processors.FilterDefaults`, exactly what
   `nbdev_proc_nbs` / `nbdev_docs` use, but without `nbdev_proc_nbs`'s first step, which installs Quarto): hidden
   cells (`#| hide`, `#| export`, `#| exporti`, `#| default_exp`) are dropped, `show_doc` cells are added after
   exported definitions and executed, `#| exports` cells are kept, the title/description become front matter.
   The processed notebooks are written to `_proc/`, as nbdev does;
2. the Quarto cell options that nbdev leaves for Quarto (`#| echo: false`, `#| output: false|asis`,
   `#| include: false`, `#| warning: false`, `#| code-fold`, ...) are applied here and stripped from the code;
3. nbconvert's `HTMLExporter` writes one self-contained page per notebook (plots and markdown images embedded) to
   `_preview/<output-file>.html` (`00_core.ipynb` -> `core.html`, as on the site), each with a navigation bar;
   `index.ipynb` becomes `index.html` (if there is no index notebook, a plain `index.html` lists the pages).

Stored outputs are shown as they are in the notebooks (nbdev's docs do not re-run notebooks); only the cells the
processors need for `show_doc` are executed. Exits non-zero, naming the notebook and the error, if any page fails.
Needs the dev environment (`pip install -e ".[dev]"`: nbdev 2, nbconvert, the package itself).
"""
import argparse, html, os, re, sys, time, traceback
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _chdir_root():
    "nbdev reads `settings.ini` from the working directory upwards."
    os.chdir(ROOT)


def list_notebooks():
    "The notebooks nbdev documents and tests: `nbs/*.ipynb`, skipping names starting with `_` or `.`."
    from nbdev.doclinks import nbglob
    return sorted(nbglob(as_path=True))


def installed_lib():
    """Is this project's package installed here with its nbdev entry point? nbdev links backticked names to the
    docs through the entry points of installed packages, so without it the pages/README lack those links."""
    from importlib.metadata import entry_points
    from nbdev.config import get_config
    return get_config().lib_path.name in {o.name for o in entry_points(group='nbdev')}


def process_nb(src, dst=None):
    """Run nbdev's docs processors on notebook `src` (as `nbdev_proc_nbs` does, without Quarto).
    Returns the processed notebook (an execnb/fastcore dict); writes it to `dst` if given."""
    _chdir_root()
    from execnb.nbio import read_nb, write_nb
    from nbdev.processors import FilterDefaults
    os.environ['IN_TEST'] = '1'  # as nbdev.serve_drv does: no nbdev_export() etc. while processing
    try:
        nb = read_nb(src)
        FilterDefaults()(nb)
    finally: os.environ.pop('IN_TEST', None)
    if dst is not None:
        Path(dst).parent.mkdir(parents=True, exist_ok=True)
        write_nb(nb, dst)
    return nb


def _process_worker(src, dst):
    "Worker for a fresh process: process one notebook, return (ok, seconds, error text)."
    t = time.time()
    try: process_nb(src, dst); return True, time.time()-t, ''
    except BaseException: return False, time.time()-t, traceback.format_exc()


# ---------------------------------------------------------------------------------------------------------------
# What Quarto does with the processed notebook, for nbconvert

_re_opt = re.compile(r'^\s*#\|\s*([\w-]+)\s*:\s*(.*?)\s*$')
_re_div_open = re.compile(r'^\s*:::+\s*\{?([^}]*)\}?\s*$')
_re_div_close = re.compile(r'^\s*:::+\s*$')


def cell_options(source):
    "Split the leading `#| key: value` Quarto options off a code cell: (options dict, remaining source)."
    lines, opts = source.splitlines(True), {}
    i = 0
    while i < len(lines):
        m = _re_opt.match(lines[i])
        if m: opts[m.group(1)] = m.group(2).strip('\'"'); i += 1
        elif not lines[i].strip() and opts: i += 1
        else: break
    return opts, ''.join(lines[i:])


def frontmatter(cell):
    "The front matter dict of a raw `---` cell, else None."
    import yaml
    src = cell.get('source', '')
    if isinstance(src, list): src = ''.join(src)
    m = re.match(r'^\s*---\s*\n(.*?)\n---\s*$', src, flags=re.S)
    if cell.get('cell_type') != 'raw' or not m: return None
    try: d = yaml.safe_load(m.group(1))
    except Exception: return None
    return d if isinstance(d, dict) else None


_gh_alerts = {'note': 'NOTE', 'tip': 'TIP', 'important': 'IMPORTANT', 'warning': 'WARNING', 'caution': 'CAUTION'}


def _divs(src, for_markdown=False):
    """Pandoc fenced divs (`::: {.callout-note}` ... `:::`) to HTML divs, as Quarto renders them, or, for markdown,
    callouts to GitHub alerts (`> [!NOTE]`) and other divs dropped (their content kept)."""
    if ':::' not in src: return src
    out, stack = [], []
    for line in src.splitlines():
        quote = '> ' * sum(stack)
        if _re_div_close.match(line) and stack:
            if for_markdown: stack.pop(); out.append('')
            else: stack.pop(); out += ['', '</div>', '']
        elif (m := _re_div_open.match(line)) and m.group(1).strip():
            classes = [c.lstrip('.') for c in m.group(1).split() if c.startswith('.')]
            if for_markdown:
                alert = next((_gh_alerts[c[8:]] for c in classes if c[8:] in _gh_alerts and c.startswith('callout-')), None)
                if alert: out += ['', f'{quote}> [!{alert}]']
                stack.append(bool(alert))
            else: stack.append(True); out += ['', f'<div class="{html.escape(" ".join(classes))}">', '']
        else: out.append((quote + line).rstrip() if for_markdown and stack else line)
    if not for_markdown: return _html_divs(out)
    return '\n'.join(out)


def _html_divs(lines):
    "Render the markdown inside `<div>`...`</div>` lines to HTML (markdown renderers leave it as text)."
    import mistune
    md = mistune.create_markdown(plugins=['table', 'strikethrough'])
    def render(i, depth):
        "Render from lines[i] to the matching close; returns (html, next index)."
        parts, buf = [], []
        while i < len(lines):
            l = lines[i]
            if l.startswith('<div class="') and l.endswith('">'):
                if buf: parts.append(md('\n'.join(buf))); buf = []
                inner, i = render(i+1, depth+1)
                parts.append(l + inner + '</div>')
                continue
            if l == '</div>' and depth: break
            buf.append(l); i += 1
        if buf: parts.append(md('\n'.join(buf)))
        return ''.join(parts), i+1
    out, buf, i = [], [], 0
    while i < len(lines):  # top level stays markdown; each outer div becomes one html block
        l = lines[i]
        if l.startswith('<div class="') and l.endswith('">'):
            inner, i = render(i+1, 1)
            out.append(l + re.sub(r'\n\s*\n', '\n', inner) + '</div>')  # no blank line: one html block
            continue
        out.append(l); i += 1
    return '\n'.join(out)


_re_nb_link = re.compile(r'(\]\(|href=")(?![a-z][a-z0-9+.-]*:|/|#)([^)"\s]*?)([^/)"\s]+)\.ipynb(#[^)"\s]*)?(?=[)"\s])', re.I)


def nb_page_links(md):
    "Links to notebooks (`00_core.ipynb#x`) to their pages (`core.html#x`), as Quarto does."
    return _re_nb_link.sub(lambda m: m.group(1) + m.group(2) + re.sub(r'^\d+[a-zA-Z0-9]*_', '', m.group(3).lower())
                           + '.html' + (m.group(4) or ''), md)


def quarto_cells(nb, for_markdown=False):
    """Apply the Quarto cell options nbdev leaves in processed notebook `nb` (an nbformat NotebookNode), in place.
    Returns the front matter dict (title, description, output-file, ...)."""
    fm, cells = {}, []
    for cell in nb.cells:
        d = frontmatter(cell)
        if d is not None: fm.update(d); continue
        if cell.cell_type == 'markdown':
            cell.source = _divs(cell.source if for_markdown else nb_page_links(cell.source), for_markdown)
            if cell.source.strip().startswith('<!-- WARNING: THIS FILE WAS AUTOGENERATED'): continue
        if cell.cell_type != 'code': cells.append(cell); continue
        opts, cell.source = cell_options(cell.source)
        low = {k: v.lower() for k, v in opts.items()}
        if low.get('include') == 'false': continue
        if low.get('echo') == 'false': cell.metadata['transient'] = {'remove_source': True}
        if low.get('output') == 'false': cell.outputs = []
        if low.get('warning') == 'false':
            cell.outputs = [o for o in cell.outputs if not (o.output_type == 'stream' and o.get('name') == 'stderr')]
        if not cell.source.strip(): cell.metadata['transient'] = {'remove_source': True}
        cell.execution_count = None
        for o in cell.outputs:
            if 'execution_count' in o: o['execution_count'] = None
        if cell.metadata.get('transient', {}).get('remove_source') and not cell.outputs: continue
        cells.append(cell)
    nb.cells = cells
    return fm


def page_name(src, fm):
    "The page's file name on the site: the front matter's `output-file` (nbdev drops the `00_` prefix)."
    return fm.get('output-file') or Path(src).with_suffix('.html').name


_CSS = """<style>
.mixaug-nav{font-family:system-ui,sans-serif;padding:.6em 1em;border-bottom:1px solid #ddd;background:#f7f7f9;
  position:sticky;top:0;z-index:10}
.mixaug-nav a{margin-right:1.2em;text-decoration:none;color:#2a76dd}.mixaug-nav a.current{font-weight:bold;color:#222}
.mixaug-nav .preview-note{float:right;color:#888;font-size:.85em}
.mixaug-desc{font-size:1.2em;color:#555;margin-top:-.3em}
.jp-RenderedMarkdown pre{background:#f5f5f5;padding:.5em .8em;border-radius:4px;margin:.6em 0}
.callout-note,.callout-tip,.callout-warning,.callout-important,.callout-caution{border-left:4px solid #2a76dd;
  background:#f3f7fd;padding:.2em 1em;margin:1em 0}
.callout-warning,.callout-caution,.callout-important{border-left-color:#e8a33d;background:#fdf8f0}
</style>"""


def _nav(pages, current, title):
    links = ''.join(f'<a href="{html.escape(fn)}"{" class=current" if fn == current else ""}>{html.escape(t)}</a>'
                    for fn, t in pages)
    return (f'<nav class="mixaug-nav"><span class="preview-note">{html.escape(title)}: local preview '
            f'(the real site is built by Quarto)</span>{links}</nav>')


def to_html(proc_path, src, pages_title=None):
    "Convert a processed notebook to (page file name, page title, html) with nbconvert; nav inserted later."
    import nbformat
    from nbconvert import HTMLExporter
    nb = nbformat.read(str(proc_path), as_version=4)
    fm = quarto_cells(nb)
    title = str(fm.get('title') or Path(src).stem)
    head = f'# {title}\n'
    if fm.get('description'): head += f'\n<p class="mixaug-desc">{html.escape(str(fm["description"]))}</p>\n'
    nb.cells.insert(0, nbformat.v4.new_markdown_cell(head))
    exp = HTMLExporter(template_name='lab', exclude_input_prompt=True, exclude_output_prompt=True, embed_images=True)
    body, _ = exp.from_notebook_node(nb, resources={'metadata': {'name': title, 'path': str(Path(src).parent)}})
    return page_name(src, fm), title, body


_HINT = """Hint: to render show_doc, nbdev (here as in `nbdev_docs` on GitHub) executes only the cells that define
exported code, call show_doc, or contain an import, in a fresh shell. A cell that imports AND uses names made by
other, unexecuted cells (test data, helpers) fails there: move its imports into an import-only cell (nbdev's FAQ,
"Found cells containing imports and other code")."""


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    ap.add_argument('--out', default='_preview', help='output folder (default: _preview)')
    ap.add_argument('--workers', type=int, default=2, help='notebooks processed at once (default: 2)')
    ap.add_argument('notebooks', nargs='*', help='only these notebooks (default: all in nbs/)')
    a = ap.parse_args(argv)
    _chdir_root()
    from nbdev.config import get_config
    cfg = get_config()
    nbs = [Path(o).resolve() for o in a.notebooks] or list_notebooks()
    if not nbs: sys.exit('docs_preview: no notebooks found in ' + str(cfg.nbs_path))
    if not installed_lib():
        print(f'docs_preview: warning: {cfg.lib_path.name} is not installed in this environment (pip install -e .), '
              'so backticked names are not linked to their docs', file=sys.stderr)
    proc, out = cfg.config_path/'_proc', (ROOT/a.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    for f in out.glob('*.html'): f.unlink()
    t0 = time.time()
    dsts = [proc/Path(s).relative_to(cfg.nbs_path) for s in nbs]
    failed = []
    # One fresh process per notebook (as nbdev_proc_nbs does): show_doc cells run in a kernel-like shell.
    kw = {'max_tasks_per_child': 1} if sys.version_info >= (3, 11) else {}
    with ProcessPoolExecutor(max_workers=max(1, a.workers), mp_context=get_context('spawn'), **kw) as ex:
        res = list(ex.map(_process_worker, nbs, dsts))
    pages = []
    for s, d, (ok, secs, err) in zip(nbs, dsts, res):
        rel = Path(s).relative_to(ROOT)
        if not ok:
            failed.append(rel); print(f'FAILED processing {rel} ({secs:.0f}s):\n{err}', file=sys.stderr)
            if 'Error in' in err: print(_HINT, file=sys.stderr)
            continue
        try:
            fn, title, body = to_html(d, s)
            pages.append((rel, fn, title, body))
            print(f'ok  {rel} -> {a.out}/{fn} (processed in {secs:.0f}s)')
        except Exception:
            failed.append(rel); print(f'FAILED rendering {rel}:\n{traceback.format_exc()}', file=sys.stderr)
    names = [p[1] for p in pages]
    dup = {n for n in names if names.count(n) > 1}
    if dup:
        failed.append(f'duplicate page names {sorted(dup)}')
        print(f'FAILED: two notebooks give the same page name: {sorted(dup)}', file=sys.stderr)
    nav = sorted(((fn, title) for _, fn, title, _ in pages), key=lambda o: o[0] != 'index.html')  # home first
    if 'index.html' not in names: nav.insert(0, ('index.html', 'Home'))
    site = str(cfg.get('title', cfg.lib_name))
    for _, fn, title, body in pages:
        body = re.sub(r'(<body[^>]*>)', lambda m: m.group(1) + _nav(nav, fn, site), body, count=1)
        body = body.replace('</head>', _CSS + '\n</head>', 1)
        (out/fn).write_text(body, encoding='utf-8')
    if 'index.html' not in names:
        items = ''.join(f'<li><a href="{html.escape(fn)}">{html.escape(t)}</a></li>' for fn, t in nav[1:])
        (out/'index.html').write_text(f'<!DOCTYPE html><html><head><meta charset="utf-8"><title>{html.escape(site)}'
            f'</title>{_CSS}</head><body>{_nav(nav, "index.html", site)}<h1>{html.escape(site)}</h1><ul>{items}</ul>'
            '</body></html>', encoding='utf-8')
    print(f'{len(pages)} of {len(nbs)} notebooks rendered to {out}/ in {time.time()-t0:.0f}s; '
          f'open {out}/index.html')
    if failed:
        print('docs_preview FAILED for: ' + ', '.join(map(str, failed)), file=sys.stderr)
        return 1
    return 0


if __name__ == '__main__': sys.exit(main())
