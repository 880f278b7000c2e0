module rosettamoe

go 1.27
