"""Hard-link torch, and every distribution it requires (extras included), from the venv running this script into the
site-packages folder given as the only argument, skipping distributions that folder already has.

CI's forward lane uses it so that torch's 5 GB (CUDA libraries mostly) are on disk once, not once a venv: the linked
files are the dev venv's own, pip sees them installed, and leaves them since they meet every requirement."""
import os, re, sys
from importlib.metadata import distribution, PackageNotFoundError

def norm(name): return re.sub(r'[-_.]+', '-', name).lower()

def main(dst):
    have = {norm(e.split('-', 1)[0]) for e in os.listdir(dst) if e.endswith('.dist-info')}
    todo, seen, linked, files = [('torch', '')], set(), set(), 0
    while todo:
        name, extras = todo.pop()
        name = norm(name)
        if name in have or (name, extras) in seen: continue
        seen.add((name, extras))
        try: dist = distribution(name)
        except PackageNotFoundError: continue
        for req in dist.requires or []:
            m, extra = re.match(r'([\w.-]+)\s*(?:\[([^\]]*)\])?', req), re.search(r'extra\s*==\s*["\']([^"\']+)', req)
            if extra and extra[1] not in extras.split(','): continue
            todo.append((m[1], (m[2] or '').replace(' ', '')))
        if name in linked: continue
        linked.add(name)
        for f in dist.files or []:
            src, to = dist.locate_file(f), os.path.join(dst, str(f))
            if str(f).startswith('..') or not src.is_file() or os.path.exists(to): continue
            os.makedirs(os.path.dirname(to), exist_ok=True)
            os.link(src, to)
            files += 1
    print(f'linked {files} files of {len(linked)} distributions (torch and what it requires) from {sys.prefix}')

if __name__ == '__main__': main(sys.argv[1])
