# bash completion for cbw(1), installed as .../bash-completion/completions/cbw.
# The candidates come from cbw itself (`cbw --complete WORD...`, the words
# before the cursor): subcommands and options from its own command table,
# disk, checkpoint, backup and job names from the running cbwd (through the
# socket of -c, $CBW_SOCKET or the default).  "@files" means file names.
_cbw()
{
    local cur=${COMP_WORDS[COMP_CWORD]} IFS=$'\n' cands
    cands=$("${COMP_WORDS[0]}" --complete "${COMP_WORDS[@]:1:COMP_CWORD-1}" 2>/dev/null) || return 0
    # Options only when asked for (a leading '-') or when nothing else fits.
    if [[ $cur != -* ]]; then
        local c nonopt=()
        for c in $cands; do [[ $c == -* ]] || nonopt+=("$c"); done
        [ ${#nonopt[@]} -eq 0 ] || cands="${nonopt[*]}"
    fi
    if [ "$cands" = "@files" ]; then
        compopt -o filenames 2>/dev/null
        COMPREPLY=($(compgen -f -- "$cur"))
    else
        COMPREPLY=($(compgen -W "$cands" -- "$cur"))
    fi
}
complete -F _cbw cbw
